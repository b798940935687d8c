"""Sweep plots as PNG bytes: perplexity against effective bits, and per-layer reconstruction error.

Rendered with matplotlib's Agg backend and no embedded software/date metadata, so the same numbers give
the same bytes (artifacts stay reproducible)."""
from __future__ import annotations

import io

_PNG_METADATA = {"Software": None}


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "squeezeflow"
    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata=_PNG_METADATA, bbox_inches="tight")
    _figure().close(fig)
    return buf.getvalue()


def _finish(fig, ax, xlabel: str, ylabel: str) -> bytes:
    """The styling both plots share (log y, small legend, light grid), then the PNG bytes."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _png(fig)


def perplexity_vs_bits(metrics: list[dict]) -> bytes:
    """One point per recipe and split; the fp32 baseline as a dashed line per split."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 4))
    base = metrics[0]
    for i, split in enumerate(sorted(base["perplexity"])):
        color = f"C{i}"
        ax.axhline(base["perplexity"][split], color=color, linestyle="--", linewidth=1, label=f"fp32 {split}")
        pts = sorted((m["bits_per_weight"], m["perplexity"][split], m["recipe"]) for m in metrics[1:])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", color=color, label=split)
        for x, y, name in pts:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    return _finish(fig, ax, "effective bits per weight (from bytes written)", "perplexity")


def layer_errors(errors: dict[str, dict[str, dict]]) -> bytes:
    """{recipe: {qualified linear: {"output_rel_err": ...}}} -> mean output error per decoder block."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4))
    for recipe, layers in errors.items():
        per_block: dict[int, list[float]] = {}
        for name, e in layers.items():
            if "output_rel_err" in e:
                per_block.setdefault(int(name.split(".")[2]), []).append(e["output_rel_err"])
        blocks = sorted(per_block)
        ax.plot(blocks, [sum(per_block[b]) / len(per_block[b]) for b in blocks], marker=".", label=recipe)
    return _finish(fig, ax, "decoder block", "mean relative output error")
