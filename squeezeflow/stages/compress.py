"""Weight-method stages: [transform] -> compress (one block, or all blocks sequentially).

Per-block methods compress each decoder block from the dense model's statistics, independently (the
flow fans out one task per block). Sequential methods (GPTQ) compress block i on activations that went
through the already-compressed blocks 0..i-1, checkpointing after every block.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from .. import device_pool, memo, moe, progress
from ..compute import device_of, dtype_of, stage_compute
from ..errors import BadInput
from ..job import ModelInfo
from ..methods import TransformsModel, get_method
from ..models import LayerStream, decoder_linears
from ..recipes import Recipe
from ..stats import StatsRef
from ..store import ArtifactStore, Ref

log = logging.getLogger(__name__)
BATCH = 4  # windows per forward batch (LayerStream.forward_block's default, as before the split)


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
    return compress_weights(store, get_method(recipe.methods[0]), block, stream.block_state(block),
                            list(decoder_linears(stream.inner.layers[block])), block_stats)


def compress_weights(store: ArtifactStore, method, block: int, weights: dict[str, torch.Tensor],
                     linears: list[str], block_stats: dict[str, dict[str, torch.Tensor]],
                     on_dequantized: Callable[[str, torch.Tensor], None] | None = None) -> Ref:
    """Compress the named linears of one block, one at a time, and store the block. `on_dequantized(linear,
    weight it computes)` is called after each linear's error report (the sequential schedule puts it in the
    block); each linear's entries of `block_stats` are dropped once it is done, so the largest thing alive
    beside a linear's own work is its own statistics, not the whole block's."""
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    meta = {}
    fallback = moe.fallbacks(block_stats)  # MoE experts whose statistics came from moe.py's dense fallback
    if fallback:
        meta["moe_fallback"] = json.dumps(fallback, sort_keys=True)
    for name in linears:
        w = weights[f"{name}.weight"]
        lin_stats = linear_stats(block_stats, name, drop=True)
        c = method.compress_linear(f"model.layers.{block}.{name}", w, lin_stats)
        w_hat = method.dequantize(c)
        layers[name] = {"format": c.format, "params": c.params, **c.metrics,
                        **reconstruction_errors(w, w_hat, lin_stats.get("hdiag"), lin_stats.get("xtx"))}
        del lin_stats
        if on_dequantized is not None:
            on_dequantized(name, w_hat)
        del w_hat
        for field, t in c.tensors.items():
            tensors[f"{name}.{field}"] = t.cpu()  # the store writes host memory (a no-op on CPU)
        if f"{name}.bias" in weights:
            tensors[f"{name}.bias"] = weights[f"{name}.bias"]
    meta["layers"] = json.dumps(layers, sort_keys=True)
    return store.put_tensors(tensors, kind="compressed-block", metadata=dict(sorted(meta.items())))


def linear_stats(block_stats: dict[str, dict[str, torch.Tensor]], linear: str,
                 drop: bool = False) -> dict[str, torch.Tensor]:
    """One linear's statistics: {statistic: tensor} for collectors keyed by linear name (hdiag, xtx), and
    {statistic.field: tensor} for those with several fields per linear (gradients: abs_sum, sq_sum);
    `drop` removes them from `block_stats`."""
    out = {}
    for stat, tensors in block_stats.items():
        for key in [k for k in tensors if k == linear or k.startswith(linear + ".")]:
            out[stat if key == linear else f"{stat}.{key[len(linear) + 1:]}"] = tensors.pop(key) if drop else tensors[key]
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
        windows, hidden = None, store.get_tensors(Ref(**state["hidden"]))["hidden"].split(1)
    else:
        blocks, windows, hidden = [], CalibrationSet.get(store, calib).windows, None
    split = _split(model, method, stream, windows, hidden)

    def make_collectors() -> list:
        return [COLLECTORS[name](**_collector_options(model)) for name in method.statistics]

    for i in range(len(blocks), stream.num_layers):
        with torch.no_grad(), stream.block(i) as layer, split.block(i, layer) as layers:
            linears = decoder_linears(layer)
            collectors = split.collect(layers, make_collectors)
            # Dense-model statistics first; the ones collected here, through compressed blocks, win.
            block_stats = {name: _on(store.get_tensors(s.blocks[i]), stream.device) for name, s in stats.items()}
            block_stats.update({c.name: c.result() for c in collectors})
            del collectors   # their fp64 sums are spent (result() consumed them)
            # Each linear's weight is read once, then replaced by what it computes: no copy of the block.
            ref = compress_weights(store, method, i, layer.state_dict(), list(linears), block_stats,
                                   on_dequantized=lambda name, w_hat: split.set_weight(layers, name, w_hat))
            split.forward(layers)
        blocks.append(ref)
        progress.report("compress", len(blocks), stream.num_layers)
        hidden_ref = store.put_tensors({"hidden": split.hidden()}, kind="sequential-activations")
        previous = store.get_index(key)
        store.put_index(key, store.put_json({"blocks": [b.model_dump() for b in blocks],
                                             "hidden": hidden_ref.model_dump()}, kind="sequential-checkpoint"))
        if previous is not None:  # activations of the previous block are no longer needed by anyone
            stale = Ref(**store.get_json(previous)["hidden"])
            if stale.sha256 != hidden_ref.sha256:
                store.delete(stale)
    return blocks


def _split(model: ModelInfo, method, stream: LayerStream, windows, hidden):
    """The calibration windows' hidden states sharded over the job's devices (device_pool.devices_for: every
    GPU for `--device cuda`), each shard on its device or in host memory as placement.py decides. `hidden`:
    the checkpoint's [1, T, d] rows to resume from, else `windows` are embedded here."""
    from .. import placement
    from ..stats import COLLECTORS
    from .sequential_devices import Shard, Split, shards, splittable

    compute = stage_compute(model)
    devices = device_pool.devices_for(compute)
    if len(devices) > 1 and not splittable(stream.inner, [COLLECTORS[n]() for n in method.statistics]):
        devices = devices[:1]  # an MoE model, or a collector whose sums cannot be merged
    n = len(windows) if hidden is None else len(hidden)
    seqlen = int(windows[0].numel() if hidden is None else hidden[0].shape[1]) if n else 0
    ranges = shards(n, len(devices), BATCH)
    peak = None
    parts = []
    for k, r in enumerate(ranges):
        s = stream if k == 0 else LayerStream(Path(model.path), model.trust_remote_code, torch.device(devices[k]),
                                              dtype_of(compute))
        if peak is None and placement.free_bytes(s.device) is not None:
            peak = placement.solve_peak_bytes(Path(model.path), stream.config, compute, method)
        where = placement.plan(s.device, len(r), seqlen, int(stream.config.hidden_size), dtype_of(compute).itemsize,
                               peak or 0)
        if where.free_bytes is not None:
            log.info("%s", where.describe(str(s.device)))
        home = s.device if where.on_device else torch.device("cpu")
        with torch.no_grad():
            h = stream.embed([windows[j] for j in r]) if hidden is None else [hidden[j] for j in r]
        h = [t.to(home) for t in h]
        parts.append(Shard(s, [t.pin_memory() for t in h] if where.pin else h, where.on_device, where.pin))
    return Split(parts, BATCH)


def _stream(model: ModelInfo) -> LayerStream:
    """The model's blocks streamed onto the job's device, in its compute dtype."""
    compute = stage_compute(model)
    # A block task of a multi-GPU run computes on the device it leased (device_pool.py), else the job's.
    return LayerStream(Path(model.path), model.trust_remote_code, device_pool.leased(device_of(compute)),
                       dtype_of(compute))


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
    # In fp64, holding at most three [out, in] tensors at once (d, w and one product): the values of
    # `w.double() - w_hat.double()`, without its two extra copies (an 8B down_proj is 470 MB in fp64).
    d = w.double().sub_(w_hat)
    squared_error = (d * d).sum()
    w = w.double()
    out = {"weight_rel_err": float(squared_error / (w * w).sum())}
    if xtx is not None:
        out["output_rel_err"] = float(_quadratic_form(d, xtx) / _quadratic_form(w, xtx))
    elif h is not None:
        hd = h.double()
        out["output_rel_err"] = float((d * d * hd).sum() / (w * w * hd).sum())
    return out


def _quadratic_form(a: torch.Tensor, H: torch.Tensor, columns: int = 1024) -> torch.Tensor:
    """tr(a H aᵀ) = Σ (a @ H) ⊙ a for fp64 a [out, in] and H [in, in] of any float dtype: the product in fp64
    with H converted a slab of columns at a time, never whole (an fp64 copy of an 8B down_proj's H is 1.6 GiB)."""
    product = torch.empty_like(a)
    for c in range(0, H.shape[1], columns):
        product[:, c:c + columns] = a @ H[:, c:c + columns].to(a.device, torch.float64)
    return product.mul_(a).sum()
