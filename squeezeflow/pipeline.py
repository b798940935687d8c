"""The six stages as plain functions: calibrate -> saliency -> compress -> pack -> evaluate -> publish.

Each takes and returns small refs into the artifact store, never tensors or modules, so the Prefect tasks
in tasks/ are thin wrappers and every stage is testable without Prefect. `STAGE_VERSIONS` is part of
every cache key: bump a stage's version when its output for the same inputs changes.
"""
from __future__ import annotations

import contextlib
import functools
import json
import platform
import shutil
import tempfile
from pathlib import Path

import torch
from pydantic import BaseModel

from . import __version__, progress
from .config import CalibrationSpec, EvalSpec, ModelRef, Recipe, load_recipe
from .errors import BadInput
from .methods import get_method
from .models import LayerStream, decoder_linears, load_config, load_tokenizer, resolve_model
from .registry import check_name as check_registry_name
from .stats import StatsRef
from .store import ArtifactStore, Ref, canonical_json, sha256_bytes

STAGE_VERSIONS = {"calibrate": "2", "saliency": "1", "transform": "1", "compress": "3", "pack": "2", "tune": "1",
                  "evaluate": "4", "publish": "5"}
FORMAT_VERSION = 1
# diag(XᵀX) is always collected: RTN does not need it, but every report shows each layer's
# activation-weighted output error, which is the number that predicts perplexity damage.
BASE_STATISTICS = ("hdiag",)


class ModelInfo(BaseModel):
    """A resolved model. The fingerprint, not the path, identifies it in cache keys and lineage."""

    ref: str
    name: str
    path: str
    fingerprint: str
    num_layers: int
    trust_remote_code: bool = False

    model_config = {"frozen": True}


class Plan(BaseModel):
    """Everything preflight checked, in the form the stages consume."""

    model: ModelInfo
    recipe: Recipe
    calibration: CalibrationSpec
    evaluation: EvalSpec
    statistics: tuple[str, ...]   # collected by the saliency stage on the dense model
    sequential: bool = False      # compress block by block through already-compressed blocks
    transform: bool = False       # compress a transformed checkpoint of the model (pipeline.transform)
    tune: bool = False            # tune the packed checkpoint on calibration text (pipeline.tune)
    # Structural methods (layer removal) lead the recipe; the weight method, if any, runs on their output
    # with statistics collected on that shallower model (`weight_statistics`), not on the original.
    structural: int = 0
    weight_statistics: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------------
# Preflight: validate everything before heavy work
# ------------------------------------------------------------------------------------------------
def target_linears(path: Path, trust_remote_code: bool = False) -> dict[str, tuple[int, int]]:
    """{qualified name: (out, in)} for every linear in every decoder block, from a meta skeleton."""
    stream = LayerStream(path, trust_remote_code)
    return {f"model.layers.{i}.{n}": (m.out_features, m.in_features)
            for i, layer in enumerate(stream.inner.layers) for n, m in decoder_linears(layer).items()}


def preflight(model: ModelRef, recipe: str | Recipe, calibration: CalibrationSpec, evaluation: EvalSpec) -> Plan:
    from .calibration import check_activation_memory, load_text
    from .malloc import release_freed_memory

    release_freed_memory()  # every run starts here: make the streamed stages' freed blocks leave RSS
    recipe = load_recipe(recipe) if isinstance(recipe, str) else recipe
    n_struct = structural_count(recipe)
    resolved = resolve_model(model.ref)
    # The registry keys artifacts by model and recipe name: refuse names it cannot hold now, not at publish.
    check_registry_name("model", resolved.name)
    check_registry_name("recipe", recipe.name)
    config = load_config(resolved.path, model.trust_remote_code)
    if getattr(config, "quantization_config", None):
        raise BadInput(f"model {model.ref!r} is already compressed; compress its base model instead")
    max_pos = getattr(config, "max_position_embeddings", None)
    for what, seqlen in (("calibration", calibration.seqlen), ("evaluation", evaluation.seqlen)):
        if max_pos and seqlen > max_pos:
            raise BadInput(f"{what} seqlen {seqlen} exceeds the model's maximum of {max_pos} positions")
    check_activation_memory(calibration.n_samples, calibration.seqlen, config.hidden_size)
    linears = target_linears(resolved.path, model.trust_remote_code)
    layers_left = config.num_hidden_layers
    for step in recipe.methods[:n_struct]:
        layers_left = get_method(step).check_layers(layers_left)
    load_text(calibration.source)  # readable and non-empty, or a BadInput naming it
    for split in evaluation.splits:
        load_text(split)
    info = ModelInfo(ref=model.ref, name=resolved.name, path=str(resolved.path), fingerprint=resolved.fingerprint,
                     num_layers=config.num_hidden_layers, trust_remote_code=model.trust_remote_code)
    if n_struct == len(recipe.methods):  # layer removal only: the artifact is the shallower dense model
        return Plan(model=info, recipe=recipe, calibration=calibration, evaluation=evaluation, statistics=(),
                    structural=n_struct)
    method = get_method(recipe.methods[n_struct])
    method.check(linears)
    resolved_config = method.resolve(config)
    if resolved_config != recipe.methods[n_struct]:
        recipe = recipe.model_copy(update={"methods": [*recipe.methods[:n_struct], resolved_config]})
        method = get_method(resolved_config)
    # Layer-wise methods read statistics of the dense model (one saliency pass feeds them all);
    # sequential ones collect theirs on the fly, on activations through the already-compressed blocks.
    methods = [method]
    stats = tuple(sorted(set(BASE_STATISTICS) | {s for m in methods if m.layerwise for s in m.requires}
                         | {s for m in methods for s in m.dense_requires}))
    if n_struct:  # the weight method's statistics come from the restructured model, collected later
        return Plan(model=info, recipe=recipe, calibration=calibration, evaluation=evaluation, statistics=(),
                    sequential=not method.layerwise, transform=method.transforms_model, tune=method.tunes,
                    structural=n_struct, weight_statistics=stats)
    return Plan(model=info, recipe=recipe, calibration=calibration, evaluation=evaluation, statistics=stats,
                sequential=not method.layerwise, transform=method.transforms_model, tune=method.tunes)


def structural_count(recipe: Recipe) -> int:
    """How many structural methods lead the recipe; BadInput unless they all come before one weight method."""
    kinds = [bool(getattr(get_method(m), "structural", False)) for m in recipe.methods]
    n = kinds.index(False) if False in kinds else len(kinds)
    if any(kinds[n:]):
        raise BadInput(f"recipe {recipe.name!r}: structural methods (layer removal) must come before the weight "
                       f"method; got {[m.method for m in recipe.methods]}")
    if len(kinds) - n > 1:
        raise BadInput(f"recipe {recipe.name!r} lists {len(kinds) - n} weight methods; a recipe runs at most one, "
                       f"after any structural ones")
    return n


def weight_recipe(plan: Plan) -> Recipe | None:
    """The recipe's weight method alone (what compress, pack and tune run), or None for removal only."""
    if plan.structural == len(plan.recipe.methods):
        return None
    return plan.recipe.model_copy(update={"methods": [plan.recipe.methods[plan.structural]]})


# ------------------------------------------------------------------------------------------------
# Stages
# ------------------------------------------------------------------------------------------------
def calibrate(store: ArtifactStore, model: ModelInfo, spec: CalibrationSpec) -> Ref:
    """Sample calibration windows; the provenance (source hash, tokenizer, seed) rides in the metadata."""
    from .calibration import build_calibration_set

    tokenizer = load_tokenizer(Path(model.path), model.trust_remote_code)
    return build_calibration_set(spec.source, tokenizer, spec.n_samples, spec.seqlen, spec.seed).put(store)


def saliency(store: ArtifactStore, model: ModelInfo, calib: Ref, statistics: tuple[str, ...]) -> dict[str, StatsRef]:
    from .stats import collect

    return collect(store, Path(model.path), model.fingerprint, calib, list(statistics),
                   trust_remote_code=model.trust_remote_code)


def transform(store: ArtifactStore, model: ModelInfo, recipe: Recipe, stats: dict[str, StatsRef],
              calib: Ref | None = None) -> ModelInfo:
    """The model as the recipe's method rewrites it before compression (QUAD's expanded, rotated
    checkpoint), stored once per (model, method config, statistics) and returned as a model of its own:
    the compress and pack stages read it, evaluation still compares against the original. Methods with
    `transform_input = "calibration"` (BackSlash's tuning) get the calibration windows instead of the
    pooled residual covariance."""
    from .stats.residual_cov import pooled_residual_cov

    method = get_method(recipe.methods[0])
    on_calibration = getattr(method, "transform_input", "residual_cov") == "calibration"
    if on_calibration and calib is None:
        raise BadInput(f"recipe {recipe.name!r} transforms the model on calibration windows; none were given")
    inputs = {"model": model.fingerprint, "method": recipe.methods[0].model_dump(mode="json"),
              "stats": {k: v.key for k, v in sorted(stats.items())}, "version": STAGE_VERSIONS["transform"]}
    if on_calibration:
        inputs["calibration"] = calib.sha256
    key = "transform-" + sha256_bytes(canonical_json(inputs))

    def build(out: Path) -> None:
        if on_calibration:
            from .calibration import CalibrationSet

            method.transform(Path(model.path), out, CalibrationSet.get(store, calib).windows)
        else:
            method.transform(Path(model.path), out, pooled_residual_cov(store, stats["residual_cov"]))

    ref = _stored_dir(store, key, "transformed-model", build)
    return model.model_copy(update={"path": str(store.materialize(ref)), "fingerprint": ref.sha256})


def _stored_dir(store: ArtifactStore, key: str, kind: str, build) -> Ref:
    """The directory stored under index `key`; `build(out_dir)` writes it the first time."""
    ref = store.get_index(key)
    if ref is None:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / kind
            build(out)
            ref = store.put_dir(out, kind=kind)
        store.put_index(key, ref)
    return ref


# ------------------------------------------------------------------------------------------------
# Structural methods (layer removal): checkpointed rounds, then a shallower dense checkpoint
# ------------------------------------------------------------------------------------------------
class StructureStep(BaseModel):
    """One structural method applied: the model it produced (a plain HF directory in the store) and
    its record (removed layers, per-round selection history)."""

    model: ModelInfo
    ref: Ref
    record: dict


def _structure_key(model: ModelInfo, config, calib: Ref, rounds: bool = False) -> str:
    """Index key of a structural step; with `rounds`, of its selection rounds, which ignore the settings
    only the finish step reads (TRSP's stage 2), so trsp-25 and trsp-25-no-stage2 share them."""
    exclude = set(getattr(get_method(config), "finish_only_fields", ())) if rounds else set()
    return ("structure-rounds-" if rounds else "structure-") + sha256_bytes(canonical_json({
        "model": model.fingerprint, "method": config.model_dump(mode="json", exclude=exclude),
        "calibration": calib.sha256, "version": STAGE_VERSIONS["transform"]}))


def _structure_context(store: ArtifactStore, model: ModelInfo, calib: Ref):
    from .calibration import CalibrationSet
    from .methods.structural import RestructureContext

    def block_io() -> list[dict]:
        from .stats import collect

        ref = collect(store, Path(model.path), model.fingerprint, calib, ["block_io"],
                      trust_remote_code=model.trust_remote_code)["block_io"]
        return [{k: float(v) for k, v in store.get_tensors(b).items()} for b in ref.blocks]

    return RestructureContext(windows=CalibrationSet.get(store, calib).windows, block_io=block_io)


def structure_round(store: ArtifactStore, model: ModelInfo, config, calib: Ref, k: int, state: dict) -> dict:
    """Round k of a structural method (e.g. one greedy TRSP/SLEB selection), stored under its own index
    key: a killed run finds rounds 0..k-1 there and resumes at round k."""
    key = f"{_structure_key(model, config, calib, rounds=True)}-round-{k}"
    ref = store.get_index(key)
    if ref is None:
        state = get_method(config).run_round(Path(model.path), k, state, _structure_context(store, model, calib))
        ref = store.put_json(state, kind="structure-round")
        store.put_index(key, ref)
    return store.get_json(ref)


def restructure(store: ArtifactStore, model: ModelInfo, config, calib: Ref, round_fn=None) -> StructureStep:
    """Apply one structural method to `model`: its rounds (each checkpointed; `round_fn` lets the flow run
    each as a Prefect task), then its finish step, which writes the shallower checkpoint."""
    method = get_method(config)
    key = _structure_key(model, config, calib)
    done = store.get_index(key)
    if done is not None:
        return StructureStep(**store.get_json(done))
    num_layers = load_config(Path(model.path), model.trust_remote_code).num_hidden_layers
    state = method.initial_state(num_layers)
    for k in range(method.rounds(num_layers)):
        state = (round_fn or structure_round)(store, model, config, calib, k, state)
    record: dict = {}

    def build(out: Path) -> None:
        record.update(method.finish(Path(model.path), out, state, _structure_context(store, model, calib)))

    ref = _stored_dir(store, key + "-model", "pruned-model", build)
    if not record:  # the directory was stored by an earlier, interrupted run: its record is lost, rebuild it
        with tempfile.TemporaryDirectory() as tmp:
            build(Path(tmp) / "again")
    out = ModelInfo(ref=model.ref, name=model.name, path=str(store.materialize(ref)), fingerprint=ref.sha256,
                    num_layers=num_layers - len(record["removed"]), trust_remote_code=model.trust_remote_code)
    step = StructureStep(model=out, ref=ref, record={"method": config.method, **record})
    store.put_index(key, store.put_json(step.model_dump(mode="json"), kind="structure-step"))
    return step


def apply_structure(store: ArtifactStore, plan: Plan, calib: Ref, step_fn=None) -> list[StructureStep]:
    """The recipe's structural methods in order, each on the model the previous one produced."""
    steps, model = [], plan.model
    for config in plan.recipe.methods[:plan.structural]:
        step = (step_fn or restructure)(store, model, config, calib)
        steps.append(step)
        model = step.model
    return steps


def compress_block(store: ArtifactStore, model: ModelInfo, block: int, recipe: Recipe,
                   stats: dict[str, StatsRef]) -> Ref:
    """Compress every linear of decoder block `block` (layer-wise methods: statistics from the dense model)."""
    stream = LayerStream(Path(model.path), model.trust_remote_code)
    block_stats = {name: store.get_tensors(s.blocks[block]) for name, s in stats.items()}
    ref, _ = compress_weights(store, get_method(recipe.methods[0]), block, stream.block_state(block),
                              list(decoder_linears(stream.inner.layers[block])), block_stats)
    return ref


def compress_weights(store: ArtifactStore, method, block: int, weights: dict[str, torch.Tensor],
                     linears: list[str], block_stats: dict[str, dict[str, torch.Tensor]]) -> tuple[Ref, dict]:
    """Compress the named linears of one block; returns the stored block and {linear: weight it computes}."""
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    w_hats: dict[str, torch.Tensor] = {}
    for name in linears:
        w = weights[f"{name}.weight"]
        lin_stats = linear_stats(block_stats, name)
        c = method.compress_linear(f"model.layers.{block}.{name}", w, lin_stats)
        w_hats[name] = method.dequantize(c)
        layers[name] = {"format": c.format, "params": c.params, **c.metrics,
                        **reconstruction_errors(w, w_hats[name], lin_stats.get("hdiag"), lin_stats.get("xtx"))}
        for field, t in c.tensors.items():
            tensors[f"{name}.{field}"] = t
        if f"{name}.bias" in weights:
            tensors[f"{name}.bias"] = weights[f"{name}.bias"]
    meta = {"layers": json.dumps(layers, sort_keys=True)}
    return store.put_tensors(tensors, kind="compressed-block", metadata=meta), w_hats


def linear_stats(block_stats: dict[str, dict[str, torch.Tensor]], linear: str) -> dict[str, torch.Tensor]:
    """One linear's statistics: {statistic: tensor} for collectors keyed by linear name (hdiag, xtx), and
    {statistic.field: tensor} for those with several fields per linear (gradients: abs_sum, sq_sum)."""
    out = {}
    for stat, tensors in block_stats.items():
        for key, t in tensors.items():
            if key == linear:
                out[stat] = t
            elif key.startswith(linear + "."):
                out[f"{stat}.{key[len(linear) + 1:]}"] = t
    return out


def compress_sequential(store: ArtifactStore, model: ModelInfo, recipe: Recipe, calib: Ref,
                        stats: dict[str, StatsRef]) -> list[Ref]:
    """Sequential methods (GPTQ): block i sees calibration activations that went through the already
    compressed blocks 0..i-1, so errors are compensated downstream. The statistics the method needs are
    collected on those activations while block i is in memory. After each block the compressed block and
    the propagated activations are checkpointed in the store, so a killed run resumes at the next block."""
    from .calibration import CalibrationSet
    from .stats import COLLECTORS

    method = get_method(recipe.methods[0])
    stream = LayerStream(Path(model.path), model.trust_remote_code)
    key = "sequential-" + sha256_bytes(canonical_json({
        "model": model.fingerprint, "calibration": calib.sha256, "recipe": recipe.model_dump(mode="json"),
        "dense_stats": {k: v.key for k, v in sorted(stats.items())}, "version": STAGE_VERSIONS["compress"],
        # statistics collected on the fly are part of the result: a changed collector must not reuse it
        "collectors": {name: COLLECTORS[name].version for name in sorted(method.requires)}}))
    checkpoint = store.get_index(key)
    if checkpoint is not None:
        state = store.get_json(checkpoint)
        blocks = [Ref(**b) for b in state["blocks"]]
        hidden = list(store.get_tensors(Ref(**state["hidden"]))["hidden"].split(1))
    else:
        blocks = []
        with torch.no_grad():
            hidden = stream.embed(CalibrationSet.get(store, calib).windows)
    for i in range(len(blocks), stream.num_layers):
        with torch.no_grad(), stream.block(i) as layer:
            linears = decoder_linears(layer)
            collectors = [COLLECTORS[name]() for name in method.requires]
            with contextlib.ExitStack() as attached:
                for c in collectors:
                    attached.enter_context(c.attach(layer))
                stream.forward_block(layer, hidden)
            # Dense-model statistics first; the ones collected here, through compressed blocks, win.
            block_stats = {name: store.get_tensors(s.blocks[i]) for name, s in stats.items()}
            block_stats.update({c.name: c.result() for c in collectors})
            weights = {k: v.detach().clone() for k, v in layer.state_dict().items()}
            ref, w_hats = compress_weights(store, method, i, weights, list(linears), block_stats)
            for name, lin in linears.items():
                lin.weight.copy_(w_hats[name])
            hidden = stream.forward_block(layer, hidden)
        blocks.append(ref)
        progress.report("compress", len(blocks), stream.num_layers)
        hidden_ref = store.put_tensors({"hidden": torch.cat(hidden)}, kind="sequential-activations")
        previous = store.get_index(key)
        store.put_index(key, store.put_json({"blocks": [b.model_dump() for b in blocks],
                                             "hidden": hidden_ref.model_dump()}, kind="sequential-checkpoint"))
        if previous is not None:  # activations of the previous block are no longer needed by anyone
            stale = Ref(**store.get_json(previous)["hidden"])
            if stale.sha256 != hidden_ref.sha256:
                store.delete(stale)
    return blocks


def reconstruction_errors(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor | None,
                          xtx: torch.Tensor | None = None) -> dict:
    """Relative weight error, and the relative output error tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) with H = XᵀX of the
    calibration inputs when the method collected it, else its diagonal h (Σ h_j ΔW_ij² / Σ h_j W_ij²)."""
    w, d = w.double(), w.double() - w_hat.double()
    out = {"weight_rel_err": float((d * d).sum() / (w * w).sum())}
    if xtx is not None:
        H = xtx.double()
        out["output_rel_err"] = float(((d @ H) * d).sum() / ((w @ H) * w).sum())
    elif h is not None:
        hd = h.double()
        out["output_rel_err"] = float((d * d * hd).sum() / (w * w * hd).sum())
    return out


def pack(store: ArtifactStore, model: ModelInfo, recipe: Recipe, blocks: list[Ref]) -> Ref:
    """Bit-pack every compressed block into the kernel format and write an HF-loadable directory.
    Streamed: one block's tensors are in memory at a time (SafetensorsWriter spools them to disk)."""
    from .kernels.formats import packed_tensors
    from .safetensors_stream import SafetensorsWriter

    src = Path(model.path)
    stream = LayerStream(src, model.trust_remote_code)
    modules: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        with SafetensorsWriter(out / "model.safetensors", metadata={"format": "pt"}) as writer:
            for i, ref in enumerate(blocks):
                data = store.get_tensors(ref)
                layers = json.loads(store.get_tensors_metadata(ref)["layers"])
                prefix = f"model.layers.{i}"
                for name, info in layers.items():
                    fields = {k[len(name) + 1:]: v for k, v in data.items() if k.startswith(name + ".")}
                    for field, t in packed_tensors(info["format"], **fields, **info["params"]).items():
                        writer.add(f"{prefix}.{name}.{field}", t)
                    modules[f"{prefix}.{name}"] = {"format": info["format"], **info["params"]}
                del data
                # Everything in the block that is not a compressed linear (norms) is copied as it is.
                for k, v in stream.block_state(i).items():
                    if k.rsplit(".", 1)[0] not in layers:
                        writer.add(f"{prefix}.{k}", v)
            for prefix in ("model.embed_tokens", "model.norm", "lm_head"):
                for k, v in stream.tensors(prefix).items():
                    writer.add(f"{prefix}.{k}", v)
        config = json.loads((src / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "squeezeflow", "format_version": FORMAT_VERSION,
                                         "recipe": recipe.name, "modules": modules}
        (out / "config.json").write_bytes(canonical_json(config))
        for f in sorted(src.iterdir()):
            if f.name.startswith(("tokenizer", "special_tokens", "generation_config", "chat_template")):
                shutil.copyfile(f, out / f.name)
        return store.put_dir(out, kind="packed-model")


def tune(store: ArtifactStore, model: ModelInfo, recipe: Recipe, calib: Ref, packed: Ref) -> Ref:
    """The packed checkpoint after the method's tuning on the calibration windows (QUAD's PEFT)."""
    from .calibration import CalibrationSet

    key = "tune-" + sha256_bytes(canonical_json({
        "packed": packed.sha256, "calibration": calib.sha256, "method": recipe.methods[0].model_dump(mode="json"),
        "version": STAGE_VERSIONS["tune"]}))
    return _stored_dir(store, key, "packed-model", lambda out: get_method(recipe.methods[0]).tune(
        store.materialize(packed), out, CalibrationSet.get(store, calib).windows))


def compress_to_packed(store: ArtifactStore, plan: Plan, calib: Ref, stats: dict[str, StatsRef]) -> tuple[list[Ref], Ref]:
    """[transform] -> compress -> pack -> [tune] as plain calls, for tests and benchmarks (the flow runs
    the same stages as Prefect tasks). Returns (compressed blocks, packed checkpoint).
    A recipe that starts with structural methods applies them first; its weight method then runs on the
    shallower model with statistics collected on it. Without a weight method the packed checkpoint is
    the shallower plain model itself (no blocks)."""
    if plan.structural:
        steps = apply_structure(store, plan, calib)
        plan = weight_plan(plan, steps[-1].model)
        if plan is None:
            return [], steps[-1].ref
        stats = saliency(store, plan.model, calib, plan.statistics)
    stats = {k: v for k, v in stats.items() if k in plan.statistics}
    target = transform(store, plan.model, plan.recipe, stats, calib) if plan.transform else plan.model
    if plan.sequential:
        blocks = compress_sequential(store, target, plan.recipe, calib, stats)
    else:
        blocks = [compress_block(store, target, i, plan.recipe, stats) for i in range(plan.model.num_layers)]
    packed = pack(store, target, plan.recipe, blocks)
    if plan.tune:
        packed = tune(store, target, plan.recipe, calib, packed)
    return blocks, packed


def weight_plan(plan: Plan, model: ModelInfo) -> Plan | None:
    """The plan of the recipe's weight method on the restructured `model` (None: no weight method)."""
    recipe = weight_recipe(plan)
    if recipe is None:
        return None
    return plan.model_copy(update={"model": model, "recipe": recipe, "statistics": plan.weight_statistics,
                                   "structural": 0, "weight_statistics": ()})


def step_metrics(store: ArtifactStore, base: ModelInfo, step: StructureStep, spec: EvalSpec) -> dict:
    """Perplexity (and KL against `base`) of a structural step's output, stored once per (model, protocol):
    a chained recipe's report shows what each step did."""
    key = "step-metrics-" + sha256_bytes(canonical_json({
        "model": step.model.fingerprint, "base": base.fingerprint, "eval": spec.model_dump(mode="json"),
        "version": STAGE_VERSIONS["evaluate"]}))
    ref = store.get_index(key)
    if ref is None:
        m = evaluate_path(Path(step.model.path), base, spec, step.record["method"])
        ref = store.put_json({"perplexity": m["perplexity"], "kl": m["kl"], "bits_per_weight": m["bits_per_weight"]},
                             kind="step-metrics")
        store.put_index(key, ref)
    return store.get_json(ref)


def chain_lineage(store: ArtifactStore, plan: Plan, calib: Ref) -> list[dict]:
    """The manifest's record of a chained recipe: every structural step (config, removed layers, output
    fingerprint, its metrics when a weight method follows), then the weight method."""
    steps = apply_structure(store, plan, calib)  # stored: index lookups only after the compress stage
    chain = []
    for config, step in zip(plan.recipe.methods, steps):
        entry = {"method": config.method, "config": config.model_dump(mode="json"), "record": step.record,
                 "num_layers": step.model.num_layers, "model_sha256": step.ref.sha256}
        if plan.structural < len(plan.recipe.methods):
            entry["metrics"] = step_metrics(store, plan.model, step, plan.evaluation)
        chain.append(entry)
    if plan.structural < len(plan.recipe.methods):
        config = plan.recipe.methods[plan.structural]
        chain.append({"method": config.method, "config": config.model_dump(mode="json"),
                      "statistics_on": steps[-1].ref.sha256, "statistics": list(plan.weight_statistics)})
    return chain


def chain_report(chain: list[dict], final: dict) -> str:
    """Markdown: what each step of a chained recipe did to perplexity."""
    splits = list(final["perplexity"])
    lines = ["", "## Steps", "", "| step | method | layers | " + " | ".join(f"ppl {s}" for s in splits) + " |",
             "|---" * (len(splits) + 3) + "|"]
    for i, c in enumerate(chain, 1):
        m = c.get("metrics") or (final if i == len(chain) else None)
        cells = [f"{m['perplexity'][s]:.3f}" if m else "–" for s in splits]
        removed = c.get("record", {}).get("removed")
        layers = f"{c['num_layers']} (removed {removed})" if removed is not None else "–"
        lines.append(f"| {i} | {c['method']} | {layers} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def library_versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "squeezeflow": __version__}
    for lib in ("torch", "transformers", "safetensors", "prefect", "boto3"):
        try:
            out[lib] = md.version(lib)
        except md.PackageNotFoundError:
            out[lib] = None
    return out


def code_version() -> dict:
    """Package version, stage versions and, in a checkout, the git commit of the code that ran."""
    return {"squeezeflow": __version__, "stages": STAGE_VERSIONS, "git_commit": git_commit()}


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """HEAD of the checkout this code runs from, read from .git directly (no subprocess: under load a
    `git` call can time out, and a missing commit would make otherwise identical manifests differ)."""
    git = Path(__file__).resolve().parent.parent / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        if (git / ref).is_file():
            return (git / ref).read_text().strip()
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return None


def eval_protocol(model: ModelInfo, spec: EvalSpec) -> dict[str, tuple[torch.Tensor, dict]]:
    """The held-out windows of each split and the protocol record that makes the number reproducible."""
    from .calibration import eval_windows, load_text, tokenize_source, tokenizer_fingerprint

    tokenizer = load_tokenizer(Path(model.path), model.trust_remote_code)
    out = {}
    for split in spec.splits:
        text = load_text(split)
        ids = tokenize_source(text, tokenizer)
        windows = eval_windows(ids, spec.seqlen, spec.max_windows)
        out[split] = (windows, {"corpus_sha256": text.sha256, "corpus_tokens": int(ids.numel()),
                                "seqlen": spec.seqlen, "windows": int(windows.shape[0]),
                                "tokens": int(windows.numel()), "bos": False,
                                "selection": "non-overlapping windows, evenly spaced over the text",
                                "tokenizer": tokenizer_fingerprint(tokenizer)["sha256"]})
    return out


def evaluate(store: ArtifactStore, model: ModelInfo, packed: Ref | None, spec: EvalSpec, recipe: str) -> Ref:
    """Perplexity of the PACKED model loaded back through from_pretrained (or of the base model when
    `packed` is None), plus size and effective bits from the bytes written."""
    path = store.materialize(packed) if packed is not None else Path(model.path)
    return store.put_json(evaluate_path(path, model, spec, recipe), kind="metrics")


def evaluate_path(path: Path, model: ModelInfo, spec: EvalSpec, recipe: str) -> dict:
    """Metrics (ARCHITECTURE.md schema) of the checkpoint directory `path`; `model` supplies the tokenizer."""
    from .evaluation.perplexity import perplexity
    from .evaluation.size import size_report
    from .models import load_model

    torch.manual_seed(0)
    net = load_model(path, torch.float32, model.trust_remote_code)
    for module in net.modules():  # decode each packed weight once, not on every forward
        if hasattr(module, "cache_dequantized"):
            module.cache_dequantized = True
    metrics = {"recipe": recipe, "uri": None, "perplexity": {}, "kl": {}, "accuracy": {}, "speed": {},
               "protocol": {"evaluation": {}}}
    protocols = eval_protocol(model, spec)
    total, done = sum(int(w.shape[0]) for w, _ in protocols.values()), 0
    for split, (windows, protocol) in protocols.items():
        result = perplexity(net, windows, on_windows=lambda n, base=done: progress.report("evaluate", base + n, total))
        done += int(windows.shape[0])
        metrics["perplexity"][split] = round(result["perplexity"], 6)
        metrics["protocol"]["evaluation"][split] = protocol
    if spec.kl_windows and Path(path).resolve() != Path(model.path).resolve():
        from .evaluation.kl import kl_and_agreement

        base = load_model(Path(model.path), torch.float32, model.trust_remote_code)
        for split, (windows, _) in protocols.items():
            r = kl_and_agreement(net, base, windows[:spec.kl_windows])
            metrics["kl"][split] = {"kl": round(r["kl"], 8), "top1_agreement": round(r["top1_agreement"], 6),
                                    "positions": r["positions"], "windows": min(spec.kl_windows, len(windows))}
        del base
    if spec.cloze_items:
        metrics["accuracy"] = cloze_accuracy(net, model, spec)
    # Bits per weight of the ORIGINAL model's linears: a method that reshapes them (QUAD's expanded
    # inputs) pays for its extra stored columns instead of diluting them over a larger count.
    metrics.update(size_report(path, target_linears(Path(model.path), model.trust_remote_code)))
    return metrics


def cloze_accuracy(net, model: ModelInfo, spec: EvalSpec) -> dict:
    """Zero-shot cloze tasks built deterministically from held-out text (JSONL sha256 in the result)."""
    from .calibration import load_text
    from .evaluation.cloze import cloze_suite

    text = load_text(spec.cloze_split)
    tokenizer = load_tokenizer(Path(model.path), model.trust_remote_code)
    with tempfile.TemporaryDirectory() as tmp:
        results = cloze_suite(net, tokenizer, text.text, text.sha256, spec.cloze_items, spec.seed, Path(tmp))
    return {task: {k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()} | {"split": spec.cloze_split}
            for task, r in results.items()}


def assemble(store: ArtifactStore, plan: Plan, calib: Ref, stats: dict[str, StatsRef], blocks: list[Ref],
             packed: Ref, metrics: Ref, baseline: Ref) -> Ref:
    """The publishable artifact: packed files + report/ + manifest.json (lineage, metrics, every file's
    sha256). Its id is a hash of its content, so identical runs give identical artifacts."""
    from .calibration import CalibrationSet
    from .compatibility import compatibility
    from .evaluation.report import render
    from .registry import content_id
    from .store import sha256_file

    m, base = store.get_json(metrics), store.get_json(baseline)
    layer_errors = {}
    for i, ref in enumerate(blocks):
        for name, info in sorted(json.loads(store.get_tensors_metadata(ref)["layers"]).items()):
            layer_errors[f"model.layers.{i}.{name}"] = {k: v for k, v in info.items() if k.endswith("_err")}
    provenance = CalibrationSet.get(store, calib).provenance
    lineage = {
        "model": {"name": plan.model.name, "ref": plan.model.ref, "fingerprint": plan.model.fingerprint},
        "recipe": plan.recipe.model_dump(mode="json"),
        "calibration": provenance,
        "statistics": {name: s.key for name, s in sorted(stats.items())},
        "stage_outputs": {"calibrate": calib.sha256, "compress": [b.sha256 for b in blocks],
                          "pack": packed.sha256, "evaluate": metrics.sha256},
        "code": code_version(),
        "libraries": library_versions(),
        "seed": plan.calibration.seed,
    }
    if plan.structural:
        lineage["chain"] = chain_lineage(store, plan, calib)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "artifact"
        shutil.copytree(store.materialize(packed), out)
        # In the lineage, so the content id covers it like everything else the manifest claims.
        lineage["compatibility"] = compatibility(out)
        (out / "report").mkdir()
        (out / "report" / "metrics.json").write_bytes(canonical_json({"results": [base, m]}))
        (out / "report" / "layer_errors.json").write_bytes(canonical_json(layer_errors))
        (out / "report" / "report.md").write_text(render(m, base, lineage, layer_errors)
                                                  + (chain_report(lineage["chain"], m) if plan.structural else ""))
        files = {p.relative_to(out).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
                 for p in sorted(out.rglob("*")) if p.is_file()}
        artifact_id = content_id(files, lineage)
        manifest = {"format_version": FORMAT_VERSION, "artifact_id": artifact_id, "model": plan.model.name,
                    "recipe": plan.recipe.name, "lineage": lineage, "metrics": m, "baseline": base, "files": files}
        (out / "manifest.json").write_bytes(canonical_json(manifest))
        return store.put_dir(out, kind="artifact")


def publish(store: ArtifactStore, artifact: Ref, registry_uri: str) -> dict:
    """Upload to the registry (manifest last) and move the `latest` alias; idempotent."""
    from .registry import Registry

    path = store.materialize(artifact)
    manifest = json.loads((path / "manifest.json").read_text())
    entry = Registry(registry_uri).publish(path, manifest["model"], manifest["recipe"], manifest["artifact_id"])
    return {"uri": entry.uri, "artifact_id": manifest["artifact_id"], "model": manifest["model"],
            "recipe": manifest["recipe"]}


def registry_for(uri: str | None) -> str:
    """The registry to publish to (empty = SQUEEZEFLOW_REGISTRY, else the embedded server), checked
    reachable now, as part of preflight."""
    from .registry import open_registry
    from .s3 import check_reachable

    registry = open_registry(uri or None)
    check_reachable(registry.uri)
    return registry.uri


def summarize(store: ArtifactStore, artifact: Ref, entry: dict | None, wall_s: float) -> dict:
    """The flow's return value: the metrics schema of ARCHITECTURE.md for the base model and the artifact."""
    manifest = artifact_json(store, artifact, "manifest.json")
    uri = entry["uri"] if entry else None
    result = dict(manifest["metrics"], uri=uri)
    result["speed"] = dict(result.get("speed") or {}, flow_wall_s=round(wall_s, 2))
    return {"artifact": {"uri": uri, "artifact_id": manifest["artifact_id"], "store_ref": artifact.model_dump()},
            "results": [manifest["baseline"], result]}


def artifact_json(store: ArtifactStore, artifact: Ref | dict, path: str):
    """One JSON file of an artifact tree in the store (e.g. report/layer_errors.json)."""
    ref = artifact if isinstance(artifact, Ref) else Ref(**artifact.get("store_ref", artifact))
    return json.loads(store.get_bytes(store.get_tree(ref)[path]))


def table_rows(result: dict) -> list[dict]:
    rows = []
    for m in result["results"]:
        row = {"recipe": m["recipe"], **{f"ppl {k}": round(v, 3) for k, v in m["perplexity"].items()},
               "bits/weight": round(m["bits_per_weight"], 3), "sparsity": round(m.get("weight_sparsity", 0.0), 3),
               "size MiB": round(m["size_bytes"] / 2**20, 1)}
        if "flow_wall_s" in (m.get("speed") or {}):
            row["wall s"] = m["speed"]["flow_wall_s"]
        rows.append(row)
    return rows
