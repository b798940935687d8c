"""The preflight's memory plan: stage peaks from the checkpoint's shapes, and refusal with the numbers when the
largest does not fit the limit (a pod's cgroup limit, stood in for by SQUEEZEFLOW_MEMORY_LIMIT). Whether the
estimate bounds a measured run is a benchmark (benchmarks/memory_plan_check.py): RSS depends on the machine."""

import pytest
from transformers import AutoModelForCausalLM

from squeezeflow import memory_plan, pipeline
from squeezeflow.config import CalibrationSpec, ComputeSpec, EvalSpec, ModelRef
from squeezeflow.errors import BadInput
from squeezeflow.models import load_config

CALIB = CalibrationSpec(n_samples=2, seqlen=32, seed=0)
EVAL = EvalSpec(seqlen=32, max_windows=1, kl_windows=1)


def test_shapes_come_from_the_headers(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    s = memory_plan.shapes(tiny_model, load_config(tiny_model))
    assert s.block_params == block
    assert s.total_params == sum(p.numel() for p in model.parameters())  # tied head: stored once
    assert s.linear_inputs == (64, 128)  # q/k/v, o and gate/up read 64 features; down_proj 128


def test_a_job_that_does_not_fit_is_refused_with_numbers(tiny_model, monkeypatch):
    monkeypatch.setenv(memory_plan.LIMIT_ENV, "1GiB")
    with pytest.raises(BadInput, match=r"needs ~\d+\.\d GiB at the evaluate stage .* SQUEEZEFLOW_MEMORY_LIMIT is 1\.0 GiB") as e:
        pipeline.preflight(ModelRef(ref=str(tiny_model)), "rtn-w4g32", CALIB, EVAL)
    assert "\n" not in str(e.value)
    monkeypatch.setenv(memory_plan.LIMIT_ENV, "64GB")
    pipeline.preflight(ModelRef(ref=str(tiny_model)), "rtn-w4g32", CALIB, EVAL)


def test_bad_limit_is_one_line(tiny_model, monkeypatch):
    monkeypatch.setenv(memory_plan.LIMIT_ENV, "lots")
    with pytest.raises(BadInput, match="SQUEEZEFLOW_MEMORY_LIMIT='lots' is not a size"):
        pipeline.preflight(ModelRef(ref=str(tiny_model)), "rtn-w4g32", CALIB, EVAL)


def test_peaks_follow_the_settings(tiny_model):
    def peaks(**kw):
        job = pipeline.preflight(ModelRef(ref=str(tiny_model)), "gptq-w4g32", kw.pop("calib", CALIB),
                                 kw.pop("evaluation", EVAL), **kw)
        return {p["stage"]: p["bytes"] for p in memory_plan.plan(job, load_config(tiny_model))["stages"]}

    base = peaks()
    assert peaks(compute=ComputeSpec(dtype="bf16"))["evaluate"] < base["evaluate"]
    assert peaks(evaluation=EVAL.model_copy(update={"kl_windows": 0}))["evaluate"] < base["evaluate"]
    assert peaks(calib=CALIB.model_copy(update={"n_samples": 64}))["compress"] > base["compress"]


@pytest.mark.parametrize("recipe, stage, copies", [("trsp-50", "restructure-0", 4), ("shortgpt-50", "restructure-0", 1),
                                                   ("quad-w4a4a8-peft4", "transform", 3), ("quad-w4a4a8-peft4", "tune", 4),
                                                   ("backslash-l1000-w8gc-s2", "transform", 4)])
def test_whole_model_stages_are_counted_whole(tiny_model, recipe, stage, copies):
    """Layer removal, QUAD's rewrite and the training methods are not streamed: the plan counts the whole model
    in fp32 as many times as the method holds it, so preflight refuses a model they cannot hold."""
    job = pipeline.preflight(ModelRef(ref=str(tiny_model)), recipe, CALIB, EVAL)
    s = memory_plan.shapes(tiny_model, load_config(tiny_model))
    peaks = {p.stage: p for p in memory_plan.stage_peaks(s, job)}
    assert peaks[stage].bytes >= s.total_params * 4 * copies + memory_plan.FIXED_OVERHEAD
    assert peaks[stage].bytes < s.total_params * 4 * (copies + 1) + memory_plan.FIXED_OVERHEAD
    assert f"×{copies}" in peaks[stage].what


def test_a_gpu_job_is_planned_on_the_device_and_the_host(tiny_model, monkeypatch):
    """On a GPU the working sets are checked against the device's memory (without the host's fixed
    overhead) and the host's share (a block, its statistics, the hidden states) against the host limit."""
    job = pipeline.preflight(ModelRef(ref=str(tiny_model)), "gptq-w4g32", CALIB, EVAL)
    gpu = job.on(ComputeSpec(device="cuda:0", dtype="bf16"))
    config = load_config(tiny_model)
    monkeypatch.setattr(memory_plan, "device_limit", lambda device: (80 << 30, f"{device}'s memory"))
    monkeypatch.setenv(memory_plan.LIMIT_ENV, "64GiB")
    p = memory_plan.check(gpu, config)
    assert p["limit_source"] == "cuda:0's memory" and p["host_limit_source"] == memory_plan.LIMIT_ENV
    assert p["device_peak_bytes"] == p["peak"]["bytes"] - memory_plan.FIXED_OVERHEAD
    assert memory_plan.FIXED_OVERHEAD < p["host_peak_bytes"] < memory_plan.FIXED_OVERHEAD + (64 << 20)
    monkeypatch.setattr(memory_plan, "device_limit", lambda device: (1 << 20, f"{device}'s memory"))
    with pytest.raises(BadInput, match=r"GiB at the \w+ stage .* cuda:0's memory is 0\.0 GiB"):
        memory_plan.check(gpu, config)
    monkeypatch.setattr(memory_plan, "device_limit", lambda device: (80 << 30, f"{device}'s memory"))
    monkeypatch.setenv(memory_plan.LIMIT_ENV, "1GiB")
    with pytest.raises(BadInput, match=r"GiB of host memory beside the GPU .* SQUEEZEFLOW_MEMORY_LIMIT is 1\.0 GiB"):
        memory_plan.check(gpu, config)
