"""The compute setting (device, dtype, statistics dtype): refused with one line where it cannot run,
`auto` resolved for this machine, recorded in the manifest, and part of the cache keys only where it
changes results — a default (cpu, fp32) run keeps every key it had before the setting existed."""
import math
import json
import logging
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from squeezeflow import dag, pipeline
from squeezeflow.compute import DEFAULT, resolve
from squeezeflow.config import CalibrationSpec, ComputeSpec, EvalSpec, ModelRef
from squeezeflow.errors import BadInput
from squeezeflow.store import LocalStore

CALIB = CalibrationSpec(n_samples=4, seqlen=32, seed=0)
EVAL = EvalSpec(seqlen=32, max_windows=2, kl_windows=1)
NO_CUDA = not torch.cuda.is_available()


def _cli(args, tmp_path, env=None):
    import os

    full = dict(os.environ, SQUEEZEFLOW_STORE=str(tmp_path / "store"), SQUEEZEFLOW_SERVICES=str(tmp_path / "services"),
                **(env or {}))
    return subprocess.run([sys.executable, "-m", "squeezeflow.cli", *args], capture_output=True, text=True,
                          env=full, timeout=300)


@pytest.mark.skipif(not NO_CUDA, reason="needs a machine without CUDA")
@pytest.mark.parametrize("argv, env, expected", [
    (["--device", "cuda"], {}, "no CUDA device"),
    (["--device", "cuda:1"], {}, "no CUDA device"),
    ([], {"SQUEEZEFLOW_DEVICE": "cuda"}, "no CUDA device"),
    ([], {"SQUEEZEFLOW_DEVICE": "tpu"}, "SQUEEZEFLOW_DEVICE='tpu'"),
    (["--device", "gpu"], {}, "device: String should match pattern"),
    (["--dtype", "int8"], {}, "dtype: expected one of 'fp32', 'bf16', 'fp16', got string 'int8'"),
], ids=["cuda", "cuda:1", "env cuda", "env bad", "bad device", "bad dtype"])
def test_compute_the_machine_cannot_run_is_exit_2_one_line_before_any_work(argv, env, expected, tiny_model, tmp_path):
    p = _cli(["compress", str(tiny_model), "--recipe", "rtn-w4g32", "--no-publish", *argv], tmp_path, env)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2, p.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("squeezeflow: error:") and expected in lines[0], p.stderr
    assert not (tmp_path / "store").exists() and not (tmp_path / "services").exists()  # nothing ran, nothing started


@pytest.mark.skipif(not NO_CUDA, reason="needs a machine without CUDA")
def test_auto_resolves_to_cpu_here_and_says_so(monkeypatch, caplog):
    monkeypatch.delenv("SQUEEZEFLOW_DEVICE", raising=False)
    with caplog.at_level(logging.INFO, logger="squeezeflow.compute"):
        assert resolve(ComputeSpec()) == DEFAULT
    assert "compute device auto: cpu" in caplog.text
    monkeypatch.setenv("SQUEEZEFLOW_DEVICE", "cpu")
    assert resolve(ComputeSpec(dtype="bf16")) == ComputeSpec(device="cpu", dtype="bf16")
    # An explicit device wins over the machine's default.
    monkeypatch.setenv("SQUEEZEFLOW_DEVICE", "cuda")
    assert resolve(ComputeSpec(device="cpu")).device == "cpu"
    with pytest.raises(BadInput, match="no CUDA device"):
        resolve(ComputeSpec())


def test_compute_spec_refuses_coercion_and_keys_by_device_kind():
    from pydantic import ValidationError

    for bad in ({"device": "cuda:"}, {"device": "cuda:x"}, {"dtype": 16}, {"stats_dtype": "fp16"}, {"extra": 1}):
        with pytest.raises(ValidationError):
            ComputeSpec(**bad)
    assert ComputeSpec(device="cuda:3", dtype="bf16").key_form() == ComputeSpec(device="cuda:0", dtype="bf16").key_form()


@pytest.fixture(scope="module")
def jobs(tiny_model):
    ref = ModelRef(ref=str(tiny_model))
    return {name: pipeline.preflight(ref, "rtn-w4g32", CALIB, EVAL, compute)
            for name, compute in {"none": None, "cpu": ComputeSpec(device="cpu"),
                                  "bf16": ComputeSpec(device="cpu", dtype="bf16")}.items()}


def test_default_compute_keeps_every_key_and_dump(jobs, tmp_path):
    """A run on cpu in fp32 carries no compute: the model's key form and dump have exactly the fields they
    had before, so every stage key (probed over the whole plan) is what it was."""
    default, cpu, bf16 = jobs["none"], jobs["cpu"], jobs["bf16"]
    assert default.model.compute is None and cpu.model == default.model
    assert set(default.model.key_form()) == {"ref", "name", "fingerprint", "num_layers", "trust_remote_code"}
    assert set(default.model.model_dump()) == {"ref", "name", "path", "fingerprint", "num_layers", "trust_remote_code",
                                               "tree"}
    assert default.key_form() == cpu.key_form() and "compute" not in json.dumps(default.key_form())
    assert default.compute == DEFAULT
    store = LocalStore(tmp_path / "s")
    rows = {j: {r["id"]: r["key"] for r in dag.probe(dag.plan(jobs[j]), store)} for j in jobs}
    assert rows["none"] == rows["cpu"]
    assert rows["none"]["calibrate"] != rows["bf16"]["calibrate"]  # bf16 is another run, keyed apart
    # the statistics' own index keys: unchanged for the default, apart for bf16
    from squeezeflow.stats import stats_key

    assert stats_key("hdiag", "f", "c", params=None) == stats_key("hdiag", "f", "c")
    assert bf16.model.key_form()["compute"] == {"device": "cpu", "dtype": "bf16", "stats_dtype": "fp64"}


@pytest.fixture(scope="module")
def runs(jobs, tmp_path_factory):
    store = LocalStore(tmp_path_factory.mktemp("compute-store"))
    return store, {name: pipeline.run_job(jobs[name], store) for name in ("none", "bf16")}


def test_bf16_runs_rtn_end_to_end_and_changes_only_the_compressed_tensors(runs):
    store, out = runs
    fp32, bf16 = out["none"], out["bf16"]
    a = load_file(store.materialize(fp32["packed"]) / "model.safetensors")
    b = load_file(store.materialize(bf16["packed"]) / "model.safetensors")
    assert set(a) == set(b)
    compressed = {k for k in a if ".layers." in k and k.rsplit(".", 1)[-1] in ("codes", "qweight", "scales", "zeros",
                                                                                  "packed", "qzeros")}
    changed = {k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])}
    assert changed and changed <= {k for k in a if ".layers." in k and "proj" in k}, sorted(changed)[:10]
    # what is not compressed (embedding, norms, head) is byte-identical: read from the checkpoint as it is
    assert all(torch.equal(a[k], b[k]) for k in a if "proj" not in k)
    assert compressed or changed
    # recorded in the manifest, resolved
    manifests = [json.loads((store.materialize(r["artifact"]) / "manifest.json").read_text()) for r in (fp32, bf16)]
    assert manifests[0]["lineage"]["compute"] == {"device": "cpu", "dtype": "fp32", "stats_dtype": "fp64"}
    assert manifests[1]["lineage"]["compute"] == {"device": "cpu", "dtype": "bf16", "stats_dtype": "fp64"}
    # evaluated in bf16: a finite perplexity, close to the fp32 one but not computed by the same kernels
    p32, p16 = (store.get_json(r["metrics"])["perplexity"]["moby-dick"] for r in (fp32, bf16))
    assert p16 == pytest.approx(p32, rel=0.05) and p16 != p32


def test_bf16_statistics_are_keyed_apart_from_the_default(runs):
    _, out = runs
    assert out["none"]["stats"]["hdiag"].key != out["bf16"]["stats"]["hdiag"].key
    assert out["none"]["blocks"] != out["bf16"]["blocks"]


def test_sequential_gptq_runs_in_bf16_with_fp32_statistics(runs, tiny_model):
    """The sequential path (activations through compressed blocks, XᵀX collected on the fly) in bf16 with
    fp32 accumulation: it runs, the statistics dtype joins its key, and only compressed tensors differ."""
    store, out = runs
    compute = ComputeSpec(device="cpu", dtype="bf16", stats_dtype="fp32")
    job = pipeline.preflight(ModelRef(ref=str(tiny_model)), "gptq-w4g32", CALIB, EVAL, compute)
    assert job.model.key_form()["compute"]["stats_dtype"] == "fp32"
    packed = pipeline.run_job(job, store, until="pack")["packed"]
    a = load_file(store.materialize(out["none"]["packed"]) / "model.safetensors")
    b = load_file(store.materialize(packed) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a if "proj" not in k)
    assert any(not torch.equal(a[k], b[k]) for k in a if "proj" in k)


def test_a_bf16_checkpoint_keeps_bf16_for_what_is_not_compressed(tiny_model, tmp_path):
    """Embedding, norms and head are copied in the checkpoint's dtype (an fp32 copy of a bf16 model's
    embedding doubled its size); the artifact loads and evaluates."""
    import shutil

    from safetensors.torch import save_file

    src = tmp_path / "tiny-bf16"
    shutil.copytree(tiny_model, src)
    state = load_file(src / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, src / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    store = LocalStore(tmp_path / "store")
    job = pipeline.preflight(ModelRef(ref=str(src)), "rtn-w4g32", CalibrationSpec(n_samples=2, seqlen=32),
                             EvalSpec(seqlen=32, max_windows=1, kl_windows=1))
    out = pipeline.run_job(job, store)
    packed = load_file(store.materialize(out["packed"]) / "model.safetensors")
    plain = {k: v for k, v in packed.items() if "proj" not in k}
    assert plain and all(v.dtype == torch.bfloat16 for v in plain.values()), {k: v.dtype for k, v in plain.items()}
    assert all(torch.equal(v, state[k].to(torch.bfloat16)) for k, v in plain.items())
    metrics = store.get_json(out["metrics"])
    assert all(math.isfinite(v) for v in metrics["perplexity"].values()) and metrics["kl"]
