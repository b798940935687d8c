"""`squeezeflow.load`: one line from an artifact to a verified model (and tokenizer)."""

import shutil

import pytest
import torch

import squeezeflow
from squeezeflow import pipeline
from squeezeflow.config import CalibrationSpec, EvalSpec, ModelRef
from squeezeflow.errors import BadInput, IntegrityError
from squeezeflow.kernels.quant_linear import QuantLinear
from squeezeflow.store import LocalStore
from sf_testing import run_stages


@pytest.fixture(scope="module")
def artifact(tiny_model, tmp_path_factory):
    plan = pipeline.preflight(ModelRef(ref=str(tiny_model)), "rtn-w4g32", CalibrationSpec(n_samples=4, seqlen=32, seed=0),
                              EvalSpec(seqlen=32, max_windows=2))
    store = LocalStore(tmp_path_factory.mktemp("load-store"))
    return store.materialize(run_stages(store, plan, base=False)["artifact"])


def test_load_returns_model_and_tokenizer(artifact):
    model, tok = squeezeflow.load(str(artifact), tokenizer=True)
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)
    ids = tok("Four score and seven years ago", return_tensors="pt").input_ids
    assert ids.shape[1] > 3
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    assert not isinstance(squeezeflow.load(str(artifact)), tuple)  # the default stays the model alone


def test_load_refuses_a_modified_artifact(artifact, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy, copy_function=shutil.copyfile)  # writable copies of 0444 files
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256|size"):
        squeezeflow.load(str(copy), tokenizer=True)


def test_load_names_a_bad_reference(tmp_path):
    with pytest.raises(BadInput, match="not a directory"):
        squeezeflow.load(str(tmp_path / "nowhere"))
