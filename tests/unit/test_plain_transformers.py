"""Never silent garbage: a process that never imports squeezeflow either loads an artifact correctly (its
format is one transformers knows) or stops with an error that names Squeezeflow and how to load it.

Without the guard, transformers warns once about the unknown quant_method, skips it, fills every packed
linear with random values and returns a model that runs (what issue 26 found)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from squeezeflow import pipeline
from squeezeflow.config import CalibrationSpec, EvalSpec, ModelRef
from squeezeflow.hf_integration import PLAIN_LOAD_GUARD
from squeezeflow.kernels.formats import FORMATS
from squeezeflow.models import load_model
from squeezeflow.store import LocalStore

CALIB = CalibrationSpec(n_samples=4, seqlen=32, seed=0)
EVAL = EvalSpec(seqlen=32, max_windows=2)
# One recipe per packed format, and a layer-pruned one (an ordinary dense checkpoint).
RECIPES = {"rtn-w4g32": "intq", "wanda-p50": "sparse", "wanda-p2:4": "nm", "nowag-vq2d4": "vq", "fp8-e4m3": "fp8",
           "rf8-gptq": "rf8", "rtn-w4g32-eg": "eg", "quad-w4a4a8": "quad", "gwq-w3g32": "intq_outliers",
           "sleb-50": None}
IDS = [[1, 17, 300, 4000, 25, 9, 77, 1234]]

# Run in a fresh interpreter: loads every directory with plain transformers and reports, per directory,
# the error text or the logits; and whether anything imported squeezeflow behind its back.
PLAIN_LOADER = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
from safetensors.torch import save_file
out = {}
for name, path in json.loads(sys.argv[1]).items():
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    except Exception as e:
        out[name] = {"error": f"{type(e).__name__}: {e}"}
        continue
    with torch.no_grad():
        save_file({"logits": model(torch.tensor(IDS)).logits.contiguous()}, sys.argv[2] + f"/{name}.safetensors")
    out[name] = {"loaded": True}
out["squeezeflow imported"] = any(m == "squeezeflow" or m.startswith("squeezeflow.") for m in sys.modules)
print(json.dumps(out))
"""


def run_without_squeezeflow(code: str, *args: str) -> dict:
    """Run `code` in a new interpreter that never imports squeezeflow; its last stdout line is JSON."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSTARTUP",)}
    env["TRANSFORMERS_VERBOSITY"] = "error"
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result.pop("squeezeflow imported") is False
    return result


@pytest.fixture(scope="module")
def packed(tiny_model, tmp_path_factory):
    store = LocalStore(tmp_path_factory.mktemp("plain-store"))  # shared: one calibration, one statistics pass
    dirs = {}
    for recipe in RECIPES:
        job = pipeline.preflight(ModelRef(ref=str(tiny_model)), recipe, CALIB, EVAL)
        _, ref = pipeline.compress_to_packed(store, job)
        dirs[recipe] = store.materialize(ref)
    return dirs


def test_every_format_is_covered(packed):
    formats = set()
    for recipe, fmt in RECIPES.items():
        qc = json.loads((packed[recipe] / "config.json").read_text()).get("quantization_config")
        assert (qc is None) == (fmt is None)
        if qc:
            assert {e["format"] for e in qc["modules"].values()} == {fmt}
            formats.add(fmt)
    assert formats == set(FORMATS)  # a new packed format needs its line in RECIPES


def test_plain_transformers_loads_correctly_or_names_squeezeflow(packed, tmp_path):
    results = run_without_squeezeflow(PLAIN_LOADER.replace("IDS", repr(IDS)),
                                      json.dumps({r: str(p) for r, p in packed.items()}), str(tmp_path))
    from safetensors.torch import load_file

    for recipe, fmt in RECIPES.items():
        result = results[recipe]
        if fmt is None:  # layer-pruned: an ordinary checkpoint, which must load with our logits
            assert result == {"loaded": True}
            with torch.no_grad():
                ours = load_model(packed[recipe])(torch.tensor(IDS)).logits
            torch.testing.assert_close(load_file(tmp_path / f"{recipe}.safetensors")["logits"], ours,
                                       rtol=0, atol=0)
        else:
            assert "error" in result, f"{recipe} ({fmt}) loaded without squeezeflow"
            assert "Squeezeflow packed checkpoint" in result["error"] and "import squeezeflow" in result["error"]


def test_the_guard_is_invisible_with_squeezeflow(packed):
    """Loading through squeezeflow is unchanged by the guard, and a re-saved model keeps no stale field."""
    config = json.loads((packed["rtn-w4g32"] / "config.json").read_text())
    assert config["transformers_weights"] == PLAIN_LOAD_GUARD
    model = load_model(packed["rtn-w4g32"])
    assert not hasattr(model.config, "transformers_weights")
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "QuantLinear"
