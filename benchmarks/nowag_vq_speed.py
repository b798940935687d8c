#!/usr/bin/env python
"""Time NoWag-VQ's compress_linear on the real SmolLM2-135M: one decoder block's 7 linears.

    .venv/bin/python benchmarks/nowag_vq_speed.py [--block 0] [--recipes nowag-vq2,nowag-vq3]
        [--samples 16] [--seqlen 256] [--uniform-h] [--linears q_proj,down_proj] [--json PATH]

h = E[x²] of each linear's input comes from a real calibration pass (`--samples` windows of `--seqlen`
tokens of sotu-calib, seed 0, pushed through blocks 0..block), or is uniform (all ones) with
`--uniform-h`. Prints one row per linear and recipe: shape, subvectors, seconds, Lloyd iterations,
converged, codes used, relative errors; then the mean seconds per linear and the projection to the
whole model (every block's 7 linears). Threads: torch's default unless `--threads N`.

On a machine shared with other busy processes, 2 intra-op threads on 2 cores can be 10x slower than 1
(each parallel op waits for a descheduled worker); compare `--threads 1`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from squeezeflow.recipes import load_recipe  # noqa: E402
from squeezeflow.methods import get_method  # noqa: E402
from squeezeflow.models import LayerStream, decoder_linears, load_tokenizer, resolve_model  # noqa: E402
from squeezeflow.pipeline import reconstruction_errors  # noqa: E402


def real_h(path: Path, block: int, samples: int, seqlen: int) -> dict[str, torch.Tensor]:
    from squeezeflow.calibration import build_calibration_set
    from squeezeflow.stats.hdiag import HDiag

    tok = load_tokenizer(path)
    windows = build_calibration_set("sotu-calib", tok, samples, seqlen, 0).windows
    stream = LayerStream(path)
    with torch.no_grad():
        hidden = stream.embed(windows)
        for i in range(block + 1):
            with stream.block(i) as layer:
                if i < block:
                    hidden = stream.forward_block(layer, hidden)
                else:
                    collector = HDiag()
                    with collector.attach(layer):
                        stream.forward_block(layer, hidden)
                    return collector.result()
    raise AssertionError("unreachable")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--block", type=int, default=0)
    ap.add_argument("--recipes", default="nowag-vq2,nowag-vq3")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--uniform-h", action="store_true", help="h = 1 for every input instead of calibration")
    ap.add_argument("--linears", default="", help="comma-separated suffixes (e.g. q_proj,down_proj); default all 7")
    ap.add_argument("--json", default="", help="also write the results to this JSON file")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: leave torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    path = resolve_model(args.model).path
    stream = LayerStream(path)
    with torch.device("meta"):
        names = list(decoder_linears(stream.inner.layers[args.block]))
    if args.linears:
        wanted = args.linears.split(",")
        names = [n for n in names if n.rsplit(".", 1)[-1] in wanted]
    weights = stream.block_state(args.block)
    n_blocks = stream.num_layers
    t0 = time.perf_counter()
    if args.uniform_h:
        hs = {n: torch.ones(weights[f"{n}.weight"].shape[1]) for n in names}
        h_source = "uniform (all ones)"
    else:
        hs = real_h(path, args.block, args.samples, args.seqlen)
        h_source = f"calibration: sotu-calib, {args.samples} x {args.seqlen} tokens, seed 0"
    h_seconds = time.perf_counter() - t0

    rows = []
    print(f"model {args.model}, block {args.block}, h: {h_source}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.2f}")
    header = f"{'recipe':<10} {'linear':<18} {'shape':>10} {'subvec':>7} {'sec':>7} {'iters':>5} {'conv':>5} " \
             f"{'used':>5} {'w_err':>8} {'out_err':>8}"
    print(header)
    for recipe in args.recipes.split(","):
        method = get_method(load_recipe(recipe).methods[0])
        for name in names:
            w = weights[f"{name}.weight"]
            t = time.perf_counter()
            c = method.compress_linear(f"model.layers.{args.block}.{name}", w, {"hdiag": hs[name]})
            sec = time.perf_counter() - t
            errs = reconstruction_errors(w, method.dequantize(c), hs[name])
            m = c.metrics
            row = {"recipe": recipe, "linear": name, "shape": list(w.shape), "subvectors": c.tensors["codes"].numel(),
                   "seconds": round(sec, 3), "iterations": m["vq_iterations"], "converged": m["vq_converged"],
                   "codes_used": m["vq_codes_used"], "k": m["vq_codebook_size"], **errs}
            rows.append(row)
            print(f"{recipe:<10} {name:<18} {'x'.join(map(str, w.shape)):>10} {row['subvectors']:>7} {sec:>7.2f} "
                  f"{row['iterations']:>5} {str(row['converged']):>5} {row['codes_used']:>5} "
                  f"{errs['weight_rel_err']:>8.4f} {errs['output_rel_err']:>8.4f}", flush=True)
    summary = {}
    for recipe in args.recipes.split(","):
        rs = [r for r in rows if r["recipe"] == recipe]
        total = sum(r["seconds"] for r in rs)
        summary[recipe] = {"linears": len(rs), "seconds_total": round(total, 2),
                           "seconds_per_linear": round(total / len(rs), 2),
                           "projected_model_seconds": round(total * n_blocks * 7 / len(rs), 1)}
        print(f"{recipe}: {total:.1f} s for {len(rs)} linears, {total / len(rs):.2f} s per linear; "
              f"whole model ({n_blocks} blocks x 7 linears) ~ {summary[recipe]['projected_model_seconds'] / 60:.1f} min")
    if args.json:
        out = {"model": args.model, "block": args.block, "h": h_source, "h_seconds": round(h_seconds, 2),
               "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
               "machine": platform.machine(), "load_avg": os.getloadavg()[0], "rows": rows, "summary": summary}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
