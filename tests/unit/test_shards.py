"""Sharded packed checkpoints: the transformers layout (index + numbered shards) under a size limit, loading
and computing exactly what the unsharded artifact computes; the default stays one model.safetensors."""
import json

import pytest
import torch
from safetensors import safe_open

import squeezeflow
from squeezeflow import pipeline
from squeezeflow.config import CalibrationSpec, EvalSpec, ModelRef
from squeezeflow.errors import BadInput
from squeezeflow.shards import INDEX, ShardedWriter, parse_size, weight_files
from squeezeflow.store import LocalStore

CALIB = CalibrationSpec(n_samples=2, seqlen=32, seed=0)
EVAL = EvalSpec(seqlen=32, max_windows=1, kl_windows=0)
LIMIT = 1 << 20  # 1 MiB: the tiny Llama's 12.6 MB fp32 embedding alone exceeds it


def test_writer_cuts_shards_in_order_and_indexes_them(tmp_path):
    with ShardedWriter(tmp_path, 3000) as w:
        for i in range(5):
            w.add(f"t{i}", torch.full((250,), float(i)))  # 1000 bytes each: three per shard
        w.add("big", torch.zeros(1000))                  # larger than the limit: a shard of its own
    index = json.loads((tmp_path / INDEX).read_text())
    assert index["metadata"]["total_size"] == 9000
    assert index["weight_map"] == {"t0": "model-00001-of-00003.safetensors", "t1": "model-00001-of-00003.safetensors",
                                   "t2": "model-00001-of-00003.safetensors", "t3": "model-00002-of-00003.safetensors",
                                   "t4": "model-00002-of-00003.safetensors", "big": "model-00003-of-00003.safetensors"}
    assert not list(tmp_path.glob(".*")), "temporary shard files left behind"
    with safe_open(weight_files(tmp_path)[1], "pt") as f:
        assert f.get_tensor("t4")[0].item() == 4.0


def test_one_shard_is_plain_model_safetensors(tmp_path):
    with ShardedWriter(tmp_path, LIMIT) as w:
        w.add("a", torch.ones(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardedWriter(tmp_path, 3000) as w:
            for i in range(4):
                w.add(f"t{i}", torch.zeros(250))
            raise RuntimeError("block failed")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text,expected", [("5GB", 5 * 10**9), ("2GiB", 2 << 30), ("1.5 MB", 1_500_000),
                                           (4 << 20, 4 << 20)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["5 parsecs", "-3GB", "100KB", ""])
def test_bad_sizes_refused_at_preflight(tiny_model, text):
    with pytest.raises(BadInput, match="max shard size") as e:
        pipeline.preflight(ModelRef(ref=str(tiny_model)), "rtn-w4g32", CALIB, EVAL, max_shard_size=text)
    assert "\n" not in str(e.value)


def test_sharded_artifact_loads_and_matches_unsharded(tiny_model, tmp_path):
    store = LocalStore(tmp_path / "store")
    plain = pipeline.preflight(ModelRef(ref=str(tiny_model)), "rtn-w4g32", CALIB, EVAL)
    sharded = pipeline.preflight(ModelRef(ref=str(tiny_model)), "rtn-w4g32", CALIB, EVAL, max_shard_size=LIMIT)
    a = store.materialize(pipeline.run_job(plain, store)["artifact"])
    b = store.materialize(pipeline.run_job(sharded, store)["artifact"])
    assert (a / "model.safetensors").exists() and not (a / INDEX).exists()
    files = weight_files(b)
    assert len(files) >= 2 and not (b / "model.safetensors").exists()
    index = json.loads((b / INDEX).read_text())
    for f in files:  # every shard under the limit, except one that holds a single larger tensor
        with safe_open(f, "pt") as st:
            assert f.stat().st_size <= LIMIT + 4096 or len(list(st.keys())) == 1, f.name
    assert set(index["weight_map"].values()) == {f.name for f in files}
    # The same tensors, bit for bit, only laid out differently; the manifest lists every shard.
    tensors = {}
    for f in files:
        with safe_open(f, "pt") as st:
            tensors.update({k: st.get_tensor(k) for k in st.keys()})
    with safe_open(a / "model.safetensors", "pt") as st:
        assert sorted(st.keys()) == sorted(tensors)
        assert all(torch.equal(st.get_tensor(k), tensors[k]) for k in st.keys())
    manifest = json.loads((b / "manifest.json").read_text())
    assert {f.name for f in files} | {INDEX} <= set(manifest["files"])
    ids = torch.arange(1, 17).unsqueeze(0)
    assert torch.equal(squeezeflow.load(str(a))(ids).logits, squeezeflow.load(str(b))(ids).logits)
    metrics_a = json.loads((a / "report" / "metrics.json").read_text())["results"][1]
    metrics_b = json.loads((b / "report" / "metrics.json").read_text())["results"][1]
    assert metrics_a["perplexity"] == metrics_b["perplexity"]
    assert metrics_a["bits_per_weight"] == metrics_b["bits_per_weight"]


def test_cli_plan_keys_the_pack_stage_by_a_non_default_shard_size(tiny_model, tmp_path):
    """--max-shard-size reaches the job: the pack stage's inputs (its cache key, once its blocks exist) carry a
    non-default size; the default leaves them as they were, and the stages before pack do not change."""
    import os
    import subprocess
    import sys

    def pack_row(*extra):
        env = {**os.environ, "SQUEEZEFLOW_STORE": str(tmp_path / "store")}
        p = subprocess.run([sys.executable, "-m", "squeezeflow.cli", "plan", str(tiny_model), "--recipe", "rtn-w4g32",
                            "--no-publish", "--json", *extra], capture_output=True, text=True, env=env, timeout=600)
        assert p.returncode == 0, p.stderr[-2000:]
        out = json.loads(p.stdout)
        assert out["memory"]["rtn-w4g32"]["fits"] and out["memory"]["rtn-w4g32"]["peak"]["bytes"] > 0
        rows = {r["id"]: r for r in out["stages"]}
        return rows["rtn-w4g32/pack"], rows["calibrate"]

    default, calib = pack_row()
    same, _ = pack_row("--max-shard-size", "5GB")
    small, calib_small = pack_row("--max-shard-size", "1MiB")
    assert "max_shard_size" not in default["inputs"] and default["inputs"] == same["inputs"]
    assert small["inputs"]["max_shard_size"] == 1 << 20
    assert calib["key"] == calib_small["key"] is not None
