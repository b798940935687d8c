"""Weight-method stages: [transform] -> compress (one block, or all blocks sequentially).

Per-block methods compress each decoder block from the dense model's statistics, independently (the
flow fans out one task per block). Sequential methods (GPTQ) compress block i on activations that went
through the already-compressed blocks 0..i-1, checkpointing after every block.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from .. import memo, moe, progress
from ..compute import device_of, dtype_of, stage_compute
from ..errors import BadInput
from ..job import ModelInfo
from ..methods import TransformsModel, get_method
from ..models import LayerStream, decoder_linears
from ..recipes import Recipe
from ..stats import StatsRef
from ..store import ArtifactStore, Ref


def transform(store: ArtifactStore, model: ModelInfo, recipe: Recipe, stats: dict[str, StatsRef],
              calib: Ref | None = None) -> ModelInfo:
    """The model as the recipe's method rewrites it before compression (QUAD's expanded, rotated
    checkpoint), stored once and returned as a model of its own: the compress and pack stages read it,
    evaluation still compares against the original. A method whose `transform_input` is "calibration"
    (BackSlash's tuning) gets the calibration windows instead of the pooled residual covariance."""
    from ..stats.residual_cov import pooled_residual_cov

    method = get_method(recipe.methods[0])
    if not isinstance(method, TransformsModel):
        raise TypeError(f"{method.name} does not transform the model")
    on_calibration = method.transform_input == "calibration"
    if on_calibration and calib is None:
        raise BadInput(f"recipe {recipe.name!r} transforms the model on calibration windows; none were given")
    inputs = {"model": model, "method": recipe.methods[0], "stats": {k: v.key for k, v in sorted(stats.items())}}
    if on_calibration:
        inputs["calibration"] = calib

    def build(out: Path) -> None:
        device = device_of(stage_compute(model))   # in the key through `model` when not the default
        if on_calibration:
            from ..calibration import CalibrationSet

            method.transform(Path(model.path), out, CalibrationSet.get(store, calib).windows, device=device)
        else:
            method.transform(Path(model.path), out, pooled_residual_cov(store, stats["residual_cov"]), device=device)

    ref = memo.stored_dir(store, memo.stage_key("transform", inputs), "transformed-model", build)
    return model.model_copy(update={"path": str(store.materialize(ref)), "fingerprint": ref.sha256, "tree": ref})


def compress_block(store: ArtifactStore, model: ModelInfo, block: int, recipe: Recipe,
                   stats: dict[str, StatsRef]) -> Ref:
    """Compress every linear of decoder block `block` (per-block methods: statistics from the dense model),
    on the job's device and in its dtype (compute.py)."""
    stream = _stream(model)
    block_stats = {name: _on(store.get_tensors(s.blocks[block]), stream.device) for name, s in stats.items()}
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
            tensors[f"{name}.{field}"] = t.cpu()  # the store writes host memory (a no-op on CPU)
        if f"{name}.bias" in weights:
            tensors[f"{name}.bias"] = weights[f"{name}.bias"]
    meta = {"layers": json.dumps(layers, sort_keys=True)}
    fallback = moe.fallbacks(block_stats)  # MoE experts whose statistics came from moe.py's dense fallback
    if fallback:
        meta["moe_fallback"] = json.dumps(fallback, sort_keys=True)
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
    from ..calibration import CalibrationSet
    from ..stats import COLLECTORS

    method = get_method(recipe.methods[0])
    stream = _stream(model)
    key = memo.stage_key("compress", {
        "schedule": "sequential", "model": model, "calibration": calib, "recipe": recipe,
        "dense_stats": {k: v.key for k, v in sorted(stats.items())},
        # statistics collected on the fly are part of the result: a changed collector must not reuse it
        "collectors": {name: COLLECTORS[name].version for name in sorted(method.statistics)}})
    checkpoint = store.get_index(key)
    if checkpoint is not None:
        state = store.get_json(checkpoint)
        blocks = [Ref(**b) for b in state["blocks"]]
        hidden = list(store.get_tensors(Ref(**state["hidden"]))["hidden"].to(stream.device).split(1))
    else:
        blocks = []
        with torch.no_grad():
            hidden = stream.embed(CalibrationSet.get(store, calib).windows)
    for i in range(len(blocks), stream.num_layers):
        with torch.no_grad(), stream.block(i) as layer:
            linears = decoder_linears(layer)
            collectors = [COLLECTORS[name](**_collector_options(model)) for name in method.statistics]
            with contextlib.ExitStack() as attached:
                for c in collectors:
                    attached.enter_context(c.attach(layer))
                stream.forward_block(layer, hidden)
            # Dense-model statistics first; the ones collected here, through compressed blocks, win.
            block_stats = {name: _on(store.get_tensors(s.blocks[i]), stream.device) for name, s in stats.items()}
            block_stats.update({c.name: c.result() for c in collectors})
            weights = {k: v.detach().clone() for k, v in layer.state_dict().items()}
            ref, w_hats = compress_weights(store, method, i, weights, list(linears), block_stats)
            for name, lin in linears.items():
                lin.weight.copy_(w_hats[name])
            hidden = stream.forward_block(layer, hidden)
        blocks.append(ref)
        progress.report("compress", len(blocks), stream.num_layers)
        hidden_ref = store.put_tensors({"hidden": torch.cat(hidden).cpu()}, kind="sequential-activations")
        previous = store.get_index(key)
        store.put_index(key, store.put_json({"blocks": [b.model_dump() for b in blocks],
                                             "hidden": hidden_ref.model_dump()}, kind="sequential-checkpoint"))
        if previous is not None:  # activations of the previous block are no longer needed by anyone
            stale = Ref(**store.get_json(previous)["hidden"])
            if stale.sha256 != hidden_ref.sha256:
                store.delete(stale)
    return blocks


def _stream(model: ModelInfo) -> LayerStream:
    """The model's blocks streamed onto the job's device, in its compute dtype."""
    compute = stage_compute(model)
    return LayerStream(Path(model.path), model.trust_remote_code, device_of(compute), dtype_of(compute))


def _on(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: t.to(device) for k, t in tensors.items()}


def _collector_options(model: ModelInfo) -> dict:
    """A collector accumulates in the job's statistics dtype; the default passes nothing (as before)."""
    from ..compute import DEFAULT, stats_dtype_of

    compute = stage_compute(model)
    return {} if compute.stats_dtype == DEFAULT.stats_dtype else {"dtype": stats_dtype_of(compute)}


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
