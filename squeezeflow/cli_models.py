"""`squeezeflow models check MODEL`: is block streaming this model's own forward, and which recipes apply.

The model runs twice on a few real calibration windows: the plain transformers forward, and LayerStream's
embed -> blocks -> head (what every statistics pass and sequential method runs). The largest logit difference
relative to the largest reference logit says whether streaming is exact (<= 1e-4 is; a wrong mask or norm
shows as a few percent or more). The recipe column runs the structural part of preflight for one preset of
each family: what `squeezeflow compress` would refuse on this model, and why.
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import BadInput

TOLERANCE = 1e-4
# One preset per recipe family (a chain included): what the support table in the README is made of.
FAMILY_PRESETS = ("rtn-w4g32", "gptq-w4g32", "gwq-w4g32", "nowag-p50", "nowag-p2:4", "nowag-vq2d4", "wanda-p50",
                  "trsp-50", "shortgpt-50", "rf8", "fp8-e4m3", "rtn-w4g32-eg", "backslash-l1000-w8gc-s2",
                  "trsp-50+rtn-w4g32", "quad-w4a4", "quarot-w4a4")


def recipe_support(config, linears: dict[str, tuple[int, int]], presets=FAMILY_PRESETS) -> dict[str, str]:
    """{preset: "ok" or the one line preflight would refuse it with}, structural checks only."""
    from . import architectures
    from .job import structural_count
    from .methods import get_method
    from .recipes import load_recipe

    out = {}
    for name in presets:
        try:
            recipe = load_recipe(name)
            n_struct = structural_count(recipe)
            architectures.check_recipe(config, recipe)
            if n_struct < len(recipe.methods):
                get_method(recipe.methods[n_struct]).check(linears)
            out[name] = "ok"
        except BadInput as e:
            out[name] = f"refused: {e}"
    return out


def check_model(path: Path, n_windows: int = 2, seqlen: int | None = None, source: str = "sotu-calib") -> dict:
    """Reference vs streamed logits on `n_windows` calibration windows, the layout found, recipe support."""
    import torch  # here, not at module level: the CLI parser imports this module (`squeezeflow --help`)

    with torch.no_grad():
        return _check_model(path, n_windows, seqlen, source)


def _check_model(path: Path, n_windows: int, seqlen: int | None, source: str) -> dict:
    import torch

    from . import architectures
    from .calibration import build_calibration_set
    from .job import target_linears
    from .models import LayerStream, load_model, load_tokenizer

    stream = LayerStream(path)
    config = stream.config
    if seqlen is None:  # above any sliding window, so a wrong mask cannot hide
        seqlen = max(64, 2 * int(getattr(config, "sliding_window", None) or 0))
        seqlen = min(seqlen, getattr(config, "max_position_embeddings", seqlen) or seqlen)
    windows = build_calibration_set(source, load_tokenizer(path), n_windows, seqlen, seed=0).windows
    reference = load_model(path)
    ref = torch.cat([reference(w.reshape(1, -1)).logits for w in windows])
    del reference
    streamed = torch.cat([stream.head(h) for h in stream.run_blocks(stream.embed(windows))])
    rel = float((streamed - ref).abs().max() / ref.abs().max())
    return {"model": str(path), "windows": n_windows, "seqlen": seqlen, "max_rel_logit_diff": rel,
            "exact": rel <= TOLERANCE, "layout": architectures.block_layout(stream),
            "recipes": recipe_support(config, target_linears(path))}


def cmd_models_check(args) -> int:
    from .models import resolve_model

    result = check_model(resolve_model(args.model).path, args.windows, args.seqlen)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        lay = result["layout"]
        print(f"{lay['family']} ({lay['model_type']}), {lay['num_layers']} layers; attention: "
              f"{', '.join(lay['attention_types'])} (window {lay['sliding_window']})")
        print(f"linears per block: {', '.join(lay['linears_per_block'])}")
        if lay.get("experts"):
            moe = lay["experts"]
            print(f"experts: {moe['num_experts']} routed, top-{moe['top_k']}, in layers {moe['moe_layers']}; "
                  f"shared: {', '.join(moe['shared_experts']) or 'none'}; "
                  f"full precision: {', '.join(moe['full_precision'])}")
        print(f"streamed vs reference logits: max |d| / max |ref| = {result['max_rel_logit_diff']:.2e} on "
              f"{result['windows']} windows of {result['seqlen']} tokens -> "
              f"{'exact' if result['exact'] else 'NOT EXACT'}")
        for name, verdict in result["recipes"].items():
            print(f"  {name:28s} {verdict}")
    return 0 if result["exact"] else 1


def add_check_parser(models_sub) -> None:
    from .strict_types import int_in

    check = models_sub.add_parser("check", help="streamed vs reference forward, decoder layout, recipe support")
    check.add_argument("model", help="known model name, local HF directory or registry entry")
    check.add_argument("--windows", type=int_in(1, 64), default=2)
    check.add_argument("--seqlen", type=int_in(8, 8192), default=None,
                       help="tokens per window (default: 64, or twice the sliding window)")
    check.add_argument("--json", action="store_true")
    check.set_defaults(fn=cmd_models_check)
