"""GPTQ through the pipeline on a tiny Llama: sequential compression, per-block checkpoints, same packed
format and loader as RTN, and lower output error than RTN at the same grid."""
import pytest
import torch

from squeezeflow import pipeline
from squeezeflow.stages import compress as compress_stage
from squeezeflow.calibration import CalibrationSet
from squeezeflow.config import CalibrationSpec, EvalSpec, ModelRef
from squeezeflow.models import load_model
from squeezeflow.store import LocalStore

CALIB = CalibrationSpec(n_samples=8, seqlen=64, seed=0)
EVAL = EvalSpec(seqlen=64, max_windows=2)


def plan_for(tiny_model, recipe):
    return pipeline.preflight(ModelRef(ref=str(tiny_model)), recipe, CALIB, EVAL)


def test_gptq_is_sequential_and_beats_rtn(tiny_model, tmp_path):
    store = LocalStore(tmp_path)
    gptq, rtn = plan_for(tiny_model, "gptq-w3g32"), plan_for(tiny_model, "rtn-w3g32")
    assert gptq.sequential and not rtn.sequential
    assert "xtx" not in gptq.statistics  # collected on the fly through compressed blocks, not on the dense model
    calib = pipeline.calibrate(store, gptq.model, CALIB)
    stats = pipeline.saliency(store, gptq.model, calib, gptq.statistics)
    g_blocks = pipeline.compress_sequential(store, gptq.model, gptq.recipe, calib, stats)
    r_blocks = [pipeline.compress_block(store, rtn.model, i, rtn.recipe, stats) for i in range(rtn.model.num_layers)]
    packed = pipeline.pack(store, gptq.model, gptq.recipe, g_blocks)
    model = load_model(store.materialize(packed))
    rtn_model = load_model(store.materialize(pipeline.pack(store, rtn.model, rtn.recipe, r_blocks)))
    dense = load_model(tiny_model)
    # GPTQ minimises the output error of every linear on the calibration activations, so the packed
    # model's final hidden states must track the dense model's better than RTN's do.
    windows = CalibrationSet.get(store, calib).windows
    with torch.no_grad():
        ref = dense.model(input_ids=windows).last_hidden_state
        err = {name: (m.model(input_ids=windows).last_hidden_state - ref).pow(2).mean().item()
               for name, m in (("gptq", model), ("rtn", rtn_model))}
    assert err["gptq"] < 0.8 * err["rtn"], err
    assert type(model.model.layers[1].mlp.down_proj).__name__ == "QuantLinear"
    assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False).shape == (1, 6)


def test_sequential_resumes_from_block_checkpoint(tiny_model, tmp_path, monkeypatch):
    store = LocalStore(tmp_path)
    plan = plan_for(tiny_model, "gptq-w4g32")
    calib = pipeline.calibrate(store, plan.model, CALIB)
    stats = pipeline.saliency(store, plan.model, calib, plan.statistics)
    calls = []
    real = pipeline.compress_weights

    def crash_on_second_block(store_, method, block, *a, **k):
        calls.append(block)
        if block == 1 and calls.count(1) == 1:
            raise RuntimeError("killed")
        return real(store_, method, block, *a, **k)

    monkeypatch.setattr(compress_stage, "compress_weights", crash_on_second_block)
    with pytest.raises(RuntimeError, match="killed"):
        pipeline.compress_sequential(store, plan.model, plan.recipe, calib, stats)
    resumed = pipeline.compress_sequential(store, plan.model, plan.recipe, calib, stats)
    assert calls == [0, 1, 1]  # block 0 came from the checkpoint
    monkeypatch.setattr(compress_stage, "compress_weights", real)
    fresh = pipeline.compress_sequential(LocalStore(tmp_path / "fresh"), plan.model, plan.recipe,
                                         LocalStore(tmp_path / "fresh").put_bytes(store.get_bytes(calib), calib.kind),
                                         pipeline.saliency(LocalStore(tmp_path / "fresh"), plan.model,
                                                           LocalStore(tmp_path / "fresh").put_bytes(store.get_bytes(calib), calib.kind),
                                                           plan.statistics))
    assert [b.sha256 for b in resumed] == [b.sha256 for b in fresh]
