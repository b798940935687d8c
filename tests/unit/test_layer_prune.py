"""Layer pruning (TRSP, ShortGPT, SLEB-style, last layers) and chained recipes on tiny Llamas:
gate exactness, removal with layer_idx renumbering, greedy selection, per-round resume, the pipeline
end to end (removal only, and removal then quantization) and bad input."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from squeezeflow import pipeline
from squeezeflow.stages.restructure import _structure_key
from squeezeflow.calibration import CalibrationSet
from squeezeflow.config import CalibrationSpec, EvalSpec, ModelRef
from squeezeflow.methods.layers import TRSPConfig
from squeezeflow.recipes import Recipe, preset
from squeezeflow.errors import BadInput
from squeezeflow.methods import get_method
from squeezeflow.methods.layers.gates import delete_layers, gate_model, layers_to_remove, save_pruned
from squeezeflow.models import load_model
from squeezeflow.store import LocalStore
from sf_testing import make_tiny_llama, run_stages

CALIB = CalibrationSpec(n_samples=4, seqlen=32, seed=0)
EVAL = EvalSpec(seqlen=32, max_windows=2)


@pytest.fixture(scope="module")
def tiny4(smollm_path, tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny4") / "tiny-4l", smollm_path, num_layers=4, seed=1)


def _ids(n=2, t=16, seed=0):
    return torch.randint(0, 49152, (n, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_gates_at_one_reproduce_the_original_logits_exactly(tiny4):
    ids = _ids()
    ref = load_model(tiny4)(input_ids=ids).logits
    model = load_model(tiny4)
    gate_model(model)
    assert torch.equal(model(input_ids=ids).logits, ref)


@torch.no_grad()
def test_masking_a_layer_equals_deleting_it(tiny4):
    ids = _ids()
    gated = load_model(tiny4)
    gates = gate_model(gated)
    gates[1].masked = True
    deleted = load_model(tiny4)
    delete_layers(deleted, [1])
    assert deleted.config.num_hidden_layers == 3
    assert [b.self_attn.layer_idx for b in deleted.model.layers] == [0, 1, 2]
    assert torch.equal(gated(input_ids=ids).logits, deleted(input_ids=ids).logits)
    # S = 0 without skipping is the same function (up to rounding): the gate scales the whole contribution.
    gates[1].masked = False
    gates[1].gate.data.zero_()
    assert torch.allclose(gated(input_ids=ids).logits, deleted(input_ids=ids).logits, atol=1e-5)


@torch.no_grad()
def test_saved_pruned_checkpoint_is_plain_hf_with_renumbered_kv_cache(tiny4, tmp_path):
    save_pruned(load_model(tiny4), tiny4, tmp_path / "pruned", [0, 2])
    cfg = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and "quantization_config" not in cfg
    assert {p.name for p in (tmp_path / "pruned").glob("*.safetensors")} == {"model.safetensors"}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")  # plain transformers, no squeezeflow
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1]
    ref = load_model(tiny4)
    delete_layers(ref, [0, 2])
    ids = _ids(1, 12)
    assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    # KV-cache generation equals recomputing the whole prefix at every step (greedy).
    out = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True)
    slow = ids
    for _ in range(5):
        nxt = model(input_ids=slow, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        slow = torch.cat([slow, nxt], 1)
    assert torch.equal(out, slow)


def test_layer_count_rounds_down_and_bad_ratios_are_bad_input():
    assert layers_to_remove(0.25, 30) == 7 and layers_to_remove(0.5, 4) == 2
    for ratio, n in ((0.0, 30), (1.0, 30), (0.1, 4), (-0.2, 30)):
        with pytest.raises(BadInput):
            layers_to_remove(ratio, n)


def test_bad_recipes_are_bad_input(tiny4):
    with pytest.raises(BadInput, match="before the weight method"):
        pipeline.preflight(ModelRef(ref=str(tiny4)), "rtn-w4g32+trsp-25", CALIB, EVAL)
    with pytest.raises(BadInput, match="weight methods"):
        pipeline.preflight(ModelRef(ref=str(tiny4)), "rtn-w4g32+rtn-w3g32", CALIB, EVAL)
    with pytest.raises(BadInput):  # 2 of 4 layers, then 1 of 2, then nothing left to remove
        pipeline.preflight(ModelRef(ref=str(tiny4)), "lastlayers-50+shortgpt-50+sleb-50", CALIB, EVAL)
    for name in ("trsp-0", "trsp-100", "shortgpt-25-no-iter", "trsp-25+"):
        with pytest.raises(BadInput):
            preset(name)


def _identity_block_model(smollm_truncated, tmp_path):
    """SmolLM2's first 3 real blocks plus a 4th block whose writers are zero: an exact identity."""
    model = load_model(smollm_truncated)
    block = type(model.model.layers[0])(model.config, 3)
    block.load_state_dict(model.model.layers[2].state_dict())
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()
    model.model.layers.insert(1, block)
    model.config.num_hidden_layers = 4
    for i, b in enumerate(model.model.layers):
        b.self_attn.layer_idx = i
    model.save_pretrained(tmp_path / "with-identity")
    for f in smollm_truncated.iterdir():
        if f.name.startswith("tokenizer"):
            (tmp_path / "with-identity" / f.name).write_bytes(f.read_bytes())
    return tmp_path / "with-identity"


def test_stage1_picks_the_identity_block_and_resume_is_exact(smollm_truncated, tmp_path):
    src = _identity_block_model(smollm_truncated, tmp_path)
    store = LocalStore(tmp_path / "store")
    plan = pipeline.preflight(ModelRef(ref=str(src)), "trsp-25-no-stage2", CalibrationSpec(n_samples=4, seqlen=32), EVAL)
    cfg = plan.recipe.methods[0].model_copy(update={"steps": 6, "lr": 0.05, "windows": 4, "seqlen": 32})
    calib = pipeline.calibrate(store, plan.model, plan.calibration)
    state = get_method(cfg).initial_state(4)
    after = pipeline.structure_round(store, plan.model, cfg, calib, 0, state)
    assert after["selected"] == [1], after["gates"]     # L1 alone drives the identity block's gate down
    assert abs(after["gates"][1]) < min(abs(g) for i, g in enumerate(after["gates"]) if i != 1)
    # A rerun finds round 0 stored and returns it without training (a killed run resumes after it).
    calls = []
    original = get_method(cfg).__class__.run_round
    try:
        get_method(cfg).__class__.run_round = lambda *a, **k: calls.append(1) or original(*a, **k)
        again = pipeline.structure_round(store, plan.model, cfg, calib, 0, state)
    finally:
        get_method(cfg).__class__.run_round = original
    assert again == after and calls == []


def test_round_failure_then_resume_gives_the_same_result(tiny4, tmp_path):
    cfg = TRSPConfig(ratio=0.5, steps=2, stage2_steps=2, windows=4, seqlen=16)
    recipe = Recipe(name="trsp-test", methods=[cfg])
    plan = pipeline.preflight(ModelRef(ref=str(tiny4)), recipe, CALIB, EVAL)
    clean = LocalStore(tmp_path / "clean")
    calib = pipeline.calibrate(clean, plan.model, plan.calibration)
    full = pipeline.restructure(clean, plan.model, cfg, calib)
    assert len(full.record["removed"]) == 2 and full.model.num_layers == 2

    crashy = LocalStore(tmp_path / "crashy")
    calib2 = pipeline.calibrate(crashy, plan.model, plan.calibration)

    def crash_after_first(store, model, config, c, k, state):
        if k == 1:
            raise RuntimeError("killed")
        return pipeline.structure_round(store, model, config, c, k, state)

    with pytest.raises(RuntimeError, match="killed"):
        pipeline.restructure(crashy, plan.model, cfg, calib2, round_fn=crash_after_first)
    seen = []

    def recording(store, model, config, c, k, state):
        seen.append((k, store.get_index(f"{_structure_key(model, config, c, rounds=True)}-round-{k}") is not None))
        return pipeline.structure_round(store, model, config, c, k, state)

    resumed = pipeline.restructure(crashy, plan.model, cfg, calib2, round_fn=recording)
    assert seen == [(0, True), (1, False)]          # round 0 came from the store
    assert resumed.ref.sha256 == full.ref.sha256          # byte-identical pruned checkpoint
    assert _untimed(resumed.record) == _untimed(full.record)


def _untimed(x):
    """A record without its wall-clock fields."""
    if isinstance(x, dict):
        return {k: _untimed(v) for k, v in x.items() if k != "seconds"}
    if isinstance(x, list):
        return [_untimed(v) for v in x]
    return x


def test_baselines_remove_the_expected_layers(tiny4, tmp_path):
    store = LocalStore(tmp_path / "store")
    for name in ("lastlayers-50", "shortgpt-50", "sleb-50"):
        plan = pipeline.preflight(ModelRef(ref=str(tiny4)), name, CALIB, EVAL)
        calib = pipeline.calibrate(store, plan.model, plan.calibration)
        step = pipeline.restructure(store, plan.model, plan.recipe.methods[0], calib)
        assert len(step.record["removed"]) == 2 and step.model.num_layers == 2
        if name.startswith("lastlayers"):
            assert step.record["removed"] == [1, 2]          # the final block stays
        if name.startswith("shortgpt"):
            infl = step.record["influence"]
            assert step.record["removed"] == sorted(sorted(range(4), key=lambda i: infl[i])[:2])
        if name.startswith("sleb"):
            assert step.record["removed"] == sorted(step.record["selection_order"])


def test_removal_only_recipe_publishes_a_plain_checkpoint(tiny4, tmp_path):
    store = LocalStore(tmp_path / "store")
    plan = pipeline.preflight(ModelRef(ref=str(tiny4)), "shortgpt-25", CALIB, EVAL)
    assert plan.structural == 1 and plan.statistics == ()
    r = run_stages(store, plan)
    assert r["blocks"] == []
    d = store.materialize(r["artifact"])
    manifest = json.loads((d / "manifest.json").read_text())
    assert "quantization_config" not in json.loads((d / "config.json").read_text())
    assert manifest["lineage"]["chain"][0]["method"] == "shortgpt"
    assert manifest["metrics"]["weight_sparsity"] == pytest.approx(0.25)  # 1 of 4 blocks' linears gone
    assert set(manifest["metrics"]["kl"]) == set(EVAL.splits)
    assert AutoModelForCausalLM.from_pretrained(d).config.num_hidden_layers == 3


def test_chained_recipe_quantizes_the_pruned_model_with_its_own_statistics(tiny4, tmp_path):
    store = LocalStore(tmp_path / "store")
    plan = pipeline.preflight(ModelRef(ref=str(tiny4)), "lastlayers-50+rtn-w4g32", CALIB, EVAL)
    assert plan.structural == 1 and plan.weight_statistics == ("hdiag",)
    r = run_stages(store, plan)
    assert len(r["blocks"]) == 2                    # only the kept blocks were compressed
    d = store.materialize(r["artifact"])
    manifest = json.loads((d / "manifest.json").read_text())
    chain = manifest["lineage"]["chain"]
    assert [c["method"] for c in chain] == ["lastlayers", "rtn"]
    assert chain[0]["record"]["removed"] == [1, 2] and chain[1]["statistics_on"] == chain[0]["model_sha256"]
    assert set(chain[0]["metrics"]["perplexity"]) == set(EVAL.splits)
    assert "## Steps" in (d / "report" / "report.md").read_text()
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and set(cfg["quantization_config"]["modules"]) >= {"model.layers.1.mlp.up_proj"}
    ids = _ids(1, 12)
    with torch.no_grad():
        assert torch.isfinite(load_model(d)(input_ids=ids).logits).all()
