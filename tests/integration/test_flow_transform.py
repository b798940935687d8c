"""The flow runs a method's transform stage (regression: until 2026-12-03 `compress_recipe` skipped it, so
QUAD in a flow compressed the untransformed model). The flow's artifact must be the same as the plain
pipeline's (pipeline.compress_to_packed), whose transform is tested against the original's perplexity."""
from __future__ import annotations

import json

import pytest

from prefect_fixtures import prefect_server, run_flow_in_child, shared_inputs, tiny_llama  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def test_flow_compresses_the_transformed_model(prefect_server, tiny_llama, tmp_path):
    from squeezeflow import pipeline
    from squeezeflow.config import CalibrationSpec, EvalSpec, ModelRef
    from squeezeflow.store import Ref, open_store

    calib, evaluation = {"n_samples": 4, "seqlen": 64}, {"seqlen": 64, "max_windows": 2}
    store = tmp_path / "store"
    out = run_flow_in_child({"model": {"ref": str(tiny_llama)}, "recipe": "quad-w4a4", "calibration": calib,
                             "evaluation": evaluation, "destinations": {"store": str(store), "publish": False}},
                            tmp_path / "run")
    art = open_store(str(store)).materialize(Ref(**out["result"]["artifact"]["store_ref"]))
    config = json.loads((art / "config.json").read_text())
    base = json.loads((tiny_llama / "config.json").read_text())
    r = config["quantization_config"]["modules"]["model.layers.0.self_attn.q_proj"]["outlier_cols"]
    assert r > 0 and config["hidden_size"] == base["hidden_size"] + r  # the residual stream was expanded

    plan = pipeline.preflight(ModelRef(ref=str(tiny_llama)), "quad-w4a4", CalibrationSpec(**calib), EvalSpec(**evaluation))
    s = open_store(str(tmp_path / "plain"))
    c = pipeline.calibrate(s, plan.model, plan.calibration)
    _, packed = pipeline.compress_to_packed(s, plan, c, pipeline.saliency(s, plan.model, c, plan.statistics))
    assert (s.materialize(packed) / "model.safetensors").read_bytes() == (art / "model.safetensors").read_bytes()
