"""Per-layer output error of the 8-bit float encoders on real SmolLM2 layers.

    .venv/bin/python benchmarks/float8_layer_error.py [--windows 8] [--blocks 0,15,29] [--linears all]
        [--heldout moby-dick] [--json out.json]

For the chosen linears (default q_proj, o_proj, down_proj; `--linears all` for all seven) of a few
blocks: the dense XᵀX of calibration windows (SOTU), then the output error tr((W − Ŵ) XᵀX (W − Ŵ)ᵀ) of
rf8 and fp8-e4m3 rounding and of their GPTQ encoders (recipes rf8-gptq, fp8-e4m3-gptq). The encoders
fit on the calibration XᵀX; `--heldout SPLIT` also scores every Ŵ on the XᵀX of that split's windows,
which the encoder never saw. Answers "does the GPTQ encoder work per layer, equally for both formats,
and out of sample?" without a full sweep; minutes on one core.
"""
from __future__ import annotations

import argparse
import json

import torch

from squeezeflow.calibration import load_text, sample_windows, tokenize_source
from squeezeflow.methods.gg import FP8Config, RF8Config
from squeezeflow.kernels import fp8_linear, rf8_linear
from squeezeflow.methods import get_method
from squeezeflow.models import decoder_linears, load_model, load_tokenizer, prepare_model

FORMATS = {"rf8": (RF8Config, rf8_linear), "fp8": (FP8Config, fp8_linear)}
LINEARS = ("q_proj", "o_proj", "down_proj")
ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    D = (W - W_hat).double()
    return float(torch.einsum("oi,ij,oj->", D, H, D))


def input_gram(model, blocks: list[int], windows: torch.Tensor, linears: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """fp64 XᵀX of the inputs of the chosen linears, from one forward pass of the dense model."""
    grams: dict[str, torch.Tensor] = {}
    hooks = []
    for b in blocks:
        for name, lin in decoder_linears(model.model.layers[b]).items():
            if name.split(".")[-1] in linears:
                def hook(mod, inp, out, key=f"{b}.{name}"):
                    x = inp[0].reshape(-1, inp[0].shape[-1]).double()
                    grams[key] = grams.get(key, 0) + x.T @ x
                hooks.append(lin.register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=windows)
    for h in hooks:
        h.remove()
    return grams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--blocks", default="0,15,29")
    ap.add_argument("--linears", default=",".join(LINEARS), help="comma list of linear names, or 'all'")
    ap.add_argument("--heldout", default="", help="also score on this split's XᵀX (e.g. moby-dick)")
    ap.add_argument("--json")
    args = ap.parse_args()

    resolved = prepare_model(args.model)
    model = load_model(resolved.path)
    tokenizer = load_tokenizer(resolved.path)
    blocks = [int(b) for b in args.blocks.split(",")]
    linears = ALL_LINEARS if args.linears == "all" else tuple(args.linears.split(","))

    def gram_of(split: str) -> dict[str, torch.Tensor]:
        ids = tokenize_source(load_text(split), tokenizer)
        return input_gram(model, blocks, sample_windows(ids, args.windows, args.seqlen, 0), linears)

    grams = gram_of("sotu-calib")
    held = gram_of(args.heldout) if args.heldout else {}
    rows = []
    cols = "| layer | rf8 rounding | rf8 gptq / rounding | fp8 rounding | fp8 gptq / rounding | rf8 / fp8 (rounding) |"
    if held:
        cols += " rf8 gptq / rounding, held-out | fp8 gptq / rounding, held-out |"
    print(cols)
    print("|---" * (cols.count("|") - 1) + "|")
    for b in blocks:
        for name, lin in decoder_linears(model.model.layers[b]).items():
            key = f"{b}.{name}"
            if key not in grams:
                continue
            W, H = lin.weight.detach().float(), grams[key]
            row = {"layer": key}
            for fmt, (config, kernel) in FORMATS.items():
                W_round = kernel.decode(*kernel.encode(W))
                rounded = output_error(W, W_round, H)
                method = get_method(config(gptq=True))
                W_gptq = method.dequantize(method.compress_linear(key, W, {"xtx": H.float()}))
                gptq = output_error(W, W_gptq, H)
                row[fmt] = {"rounding": rounded, "gptq": gptq, "ratio": gptq / rounded}
                if held:
                    row[fmt]["heldout_rounding"] = output_error(W, W_round, held[key])
                    row[fmt]["heldout_gptq"] = output_error(W, W_gptq, held[key])
                    row[fmt]["heldout_ratio"] = row[fmt]["heldout_gptq"] / row[fmt]["heldout_rounding"]
            rows.append(row)
            line = (f"| {key} | {row['rf8']['rounding']:.4g} | {row['rf8']['ratio']:.3f} | {row['fp8']['rounding']:.4g} "
                    f"| {row['fp8']['ratio']:.3f} | {row['rf8']['rounding'] / row['fp8']['rounding']:.2f} |")
            if held:
                line += f" {row['rf8']['heldout_ratio']:.3f} | {row['fp8']['heldout_ratio']:.3f} |"
            print(line, flush=True)
    # The layers' errors differ by orders of magnitude (massive-activation channels): a few dominate the sum.
    for fmt in FORMATS:
        line = f"{fmt}: summed output error, GPTQ / rounding: {sum(r[fmt]['gptq'] for r in rows) / sum(r[fmt]['rounding'] for r in rows):.3f}"
        if held:
            line += (f" (held-out {sum(r[fmt]['heldout_gptq'] for r in rows) / sum(r[fmt]['heldout_rounding'] for r in rows):.3f})")
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
