"""How much of the 8-bit float formats' perplexity loss sits in the massive-activation input columns?

    .venv/bin/python benchmarks/float8_massive_columns.py [--share 0.05] [--json out.json]

SmolLM2 has a few input channels that carry most of a linear's E[x²] (one down_proj input holds 77–89% of
XᵀX's trace in blocks 11 and 28; benchmarks/float8_layer_error.py). Rounding the weight that multiplies
such a channel decides much of the layer's output error. This rounds every decoder linear with rf8 and
fp8-e4m3 (the recipes' encoders, no GPTQ), once as they are and once with the columns whose share of
diag(XᵀX) exceeds --share kept exact, and measures perplexity on both held-out splits (16 evenly spaced
512-token windows, as ggd_sweep.py). Dense in-memory round trips, no packing: a diagnostic, minutes.
"""
from __future__ import annotations

import argparse
import json

import torch

from float8_layer_error import ALL_LINEARS, FORMATS, input_gram
from squeezeflow.calibration import eval_windows, load_text, sample_windows, tokenize_source
from squeezeflow.evaluation.perplexity import perplexity
from squeezeflow.models import decoder_linears, load_model, load_tokenizer, prepare_model

SPLITS = ("sotu-2000-2021", "moby-dick")


def round_model(model, kernel, keep: dict[str, torch.Tensor]) -> int:
    """Replace every decoder linear's weight by its rounded value, except the columns in `keep`; returns
    how many weights stayed exact."""
    kept = 0
    for b, layer in enumerate(model.model.layers):
        for name, lin in decoder_linears(layer).items():
            W = lin.weight.data.float()
            W_hat = kernel.decode(*kernel.encode(W))
            cols = keep.get(f"{b}.{name}")
            if cols is not None and len(cols):
                W_hat[:, cols] = W[:, cols]
                kept += len(cols) * W.shape[0]
            lin.weight.data.copy_(W_hat.to(lin.weight.dtype))
    return kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib-windows", type=int, default=16)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--share", type=float, default=0.05, help="keep columns above this share of diag(XᵀX)")
    ap.add_argument("--json")
    args = ap.parse_args()

    resolved = prepare_model(args.model)
    tokenizer = load_tokenizer(resolved.path)
    model = load_model(resolved.path)
    calib = sample_windows(tokenize_source(load_text("sotu-calib"), tokenizer), args.calib_windows, 512, 0)
    grams = input_gram(model, list(range(len(model.model.layers))), calib, ALL_LINEARS)
    keep = {}
    for key, H in grams.items():
        d = H.diag()
        keep[key] = (d / d.sum() > args.share).nonzero().flatten()
    del grams
    evals = {s: eval_windows(tokenize_source(load_text(s), tokenizer), 512, args.eval_windows) for s in SPLITS}

    def ppl(m) -> dict[str, float]:
        return {s: round(perplexity(m, w)["perplexity"], 3) for s, w in evals.items()}

    ref = ppl(model)
    n_weights = sum(lin.weight.numel() for layer in model.model.layers for lin in decoder_linears(layer).values())
    rows = [{"config": "fp32", "kept_exact": 0, "perplexity": ref}]
    print("| config | kept exact (share of linear weights) | ppl SOTU | ppl Moby Dick | SOTU vs fp32 | Moby vs fp32 |")
    print("|---|---|---|---|---|---|")
    print(f"| fp32 | - | {ref[SPLITS[0]]:.3f} | {ref[SPLITS[1]]:.3f} | - | - |", flush=True)
    for fmt, (_, kernel) in FORMATS.items():
        for massive in (False, True):
            m = load_model(resolved.path)
            kept = round_model(m, kernel, keep if massive else {})
            p = ppl(m)
            rel = {s: p[s] / ref[s] - 1 for s in SPLITS}
            config = f"{fmt}, massive columns exact" if massive else fmt
            rows.append({"config": config, "kept_exact": kept, "perplexity": p, "relative": rel})
            print(f"| {config} | {kept} ({kept / n_weights:.2%}) | {p[SPLITS[0]]:.3f} | {p[SPLITS[1]]:.3f} "
                  f"| {100 * rel[SPLITS[0]]:+.2f}% | {100 * rel[SPLITS[1]]:+.2f}% |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "columns_kept": {k: v.tolist() for k, v in keep.items() if len(v)},
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
