"""The artifact store on a real S3 server (SeaweedFS): same contract as the local directory backend."""
import uuid

import pytest
import torch

from squeezeflow import pipeline
from squeezeflow.config import CalibrationSpec, EvalSpec, ModelRef
from squeezeflow.errors import IntegrityError
from squeezeflow.s3 import client
from squeezeflow.store import S3Store, open_store

pytestmark = pytest.mark.integration


@pytest.fixture
def s3_store(s3_server) -> S3Store:
    store = open_store(f"s3://{s3_server['bucket']}/store-{uuid.uuid4().hex[:8]}")
    assert isinstance(store, S3Store)
    return store


def test_roundtrip_index_and_tree(s3_store, tmp_path):
    ref = s3_store.put_tensors({"w": torch.arange(12.0).reshape(3, 4)}, "t", metadata={"a": "b"})
    assert s3_store.exists(ref) and s3_store.put_tensors({"w": torch.arange(12.0).reshape(3, 4)}, "t", metadata={"a": "b"}) == ref
    assert torch.equal(s3_store.get_tensors(ref)["w"], torch.arange(12.0).reshape(3, 4))
    s3_store.put_index("key", ref)
    assert s3_store.get_index("key") == ref and s3_store.get_index("other") is None
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.json").write_text("{}")
    tree = s3_store.put_dir(tmp_path / "d")
    assert (s3_store.materialize(tree, tmp_path / "out") / "x.json").read_text() == "{}"


def test_tampered_object_is_refused(s3_store):
    ref = s3_store.put_bytes(b"weights", "blob")
    client().put_object(Bucket=s3_store.loc.bucket, Key=s3_store._key(ref.sha256), Body=b"weightz")
    with pytest.raises(IntegrityError, match="corrupted"):
        s3_store.get_bytes(ref)


def test_stages_run_against_an_s3_store(s3_store, tiny_model):
    plan = pipeline.preflight(ModelRef(ref=str(tiny_model)), "rtn-w4g32", CalibrationSpec(n_samples=2, seqlen=32),
                              EvalSpec(seqlen=32, max_windows=1))
    calib = pipeline.calibrate(s3_store, plan.model, plan.calibration)
    stats = pipeline.saliency(s3_store, plan.model, calib, plan.statistics)
    block = pipeline.compress_block(s3_store, plan.model, 0, plan.recipe, stats)
    assert set(s3_store.get_tensors(block)) >= {"self_attn.q_proj.codes", "self_attn.q_proj.scales"}
    # A second process (here: a fresh client) finds the statistics through the store's index.
    again = pipeline.saliency(open_store(s3_store.uri), plan.model, calib, plan.statistics)
    assert again == stats
