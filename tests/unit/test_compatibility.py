"""The manifest's compatibility block: derived from the packed config, and in step with what kernels/
and export.py really support (so a new format or kernel cannot silently leave the block wrong)."""
from __future__ import annotations

import inspect
import json

import pytest

from squeezeflow import export
from squeezeflow.compatibility import (COMPRESSED_TENSORS_FORMATS, TRITON_FORMATS, VLLM_BASIS, VLLM_STATUSES,
                                       compatibility)
from squeezeflow.errors import BadInput
from squeezeflow.kernels.formats import FORMATS


def test_triton_formats_are_the_ones_whose_module_dispatches_to_triton():
    with_triton = {name for name, cls in FORMATS.items() if "use_triton(" in inspect.getsource(inspect.getmodule(cls))}
    assert with_triton == set(TRITON_FORMATS)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_compressed_tensors_formats_match_what_export_accepts(fmt):
    try:
        export._refuse_unsupported({"m": {"format": fmt}})
        accepted = True
    except BadInput:
        accepted = False
    assert accepted == (fmt in COMPRESSED_TENSORS_FORMATS)


def _dir(tmp_path, quantization_config):
    config = {"model_type": "llama"}
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_intq_artifact_runs_everywhere(tmp_path):
    qc = {"quant_method": "squeezeflow", "format_version": 1,
          "modules": {f"model.layers.0.{n}": {"format": "intq", "bits": 4, "group_size": 64} for n in ("q", "k")}}
    block = compatibility(_dir(tmp_path, qc))
    assert block["formats"] == [{"name": "intq", "modules": 2, "kernels": ["torch", "triton"], "compressed_tensors": True,
                                 "vllm": {"status": "served", "how": FORMATS["intq"].vllm[1], "basis": VLLM_BASIS}}]
    assert block["runtimes"]["vllm"]["basis"] == "on paper, not run on a GPU"
    assert block["format_version"] == 1
    assert all(r["supported"] for r in block["runtimes"].values())
    assert set(block["tested_with"]) == {"torch", "transformers", "safetensors", "prefect"}
    assert block["tested_with"]["torch"]  # installed here, so a version string
    assert compatibility(tmp_path) == block  # deterministic: no clock, no paths


def test_mixed_formats_say_which_layer_lacks_a_kernel(tmp_path):
    qc = {"quant_method": "squeezeflow", "format_version": 1,
          "modules": {"a": {"format": "intq"}, "b": {"format": "eg"}}}
    block = compatibility(_dir(tmp_path, qc))
    assert not block["runtimes"]["triton"]["supported"] and "eg" in block["runtimes"]["triton"]["how"]
    assert not block["runtimes"]["vllm-compressed-tensors"]["supported"]
    assert block["runtimes"]["torch-reference"]["supported"]


def test_plain_checkpoint(tmp_path):
    block = compatibility(_dir(tmp_path, None))
    assert block["quant_method"] is None and block["formats"] == []
    assert block["runtimes"]["vllm-compressed-tensors"]["supported"]


# --- what vLLM can serve (on paper) ---------------------------------------------------------------

@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_format_states_what_vllm_can_serve(fmt):
    cls = FORMATS[fmt]
    assert "vllm" in vars(cls), f"{cls.__name__} inherits its vLLM statement instead of making its own"
    status, how = cls.vllm
    assert status in VLLM_STATUSES and len(how) > 20
    # vLLM only ever sees what `squeezeflow export` writes: served needs an export, dense ones say dense.
    assert (status != "not-served") == (fmt in COMPRESSED_TENSORS_FORMATS)
    assert (status == "served-dense") == (cls.compressed_tensors == "dense")
    if status == "not-served":
        assert "dequantize" in how or "no vLLM" in how


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_the_manifest_carries_each_formats_vllm_statement_marked_on_paper(tmp_path, fmt):
    qc = {"quant_method": "squeezeflow", "format_version": 1, "modules": {"m": {"format": fmt, "bits": 4}}}
    block = compatibility(_dir(tmp_path, qc))
    (entry,) = block["formats"]
    assert entry["vllm"]["status"] == FORMATS[fmt].vllm[0] and entry["vllm"]["basis"] == VLLM_BASIS
    assert block["runtimes"]["vllm"]["supported"] == (entry["vllm"]["status"] != "not-served")
    assert block["runtimes"]["vllm"]["basis"] == "on paper, not run on a GPU"


@pytest.mark.parametrize("bits, served", [(2, False), (3, False), (4, True), (8, True)])
def test_integer_grids_vllm_cannot_take_are_not_served(tmp_path, bits, served):
    qc = {"quant_method": "squeezeflow", "format_version": 1,
          "modules": {"a": {"format": "intq", "bits": bits, "group_size": 64}}}
    vllm = compatibility(_dir(tmp_path, qc))["formats"][0]["vllm"]
    assert (vllm["status"] == "served") == served
    assert served or f"{bits}-bit" in vllm["how"]
