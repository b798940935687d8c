"""Perplexity against calibration set size, for several recipes, on one model.

NoWag's paper claims it needs less calibration data than GPTQ. This runs one `squeezeflow sweep` per
calibration size (each sweep shares its statistics across the recipes; every sweep uses the same
evaluation windows) and prints one table: rows = recipe, columns = windows, per held-out split.

    .venv/bin/python benchmarks/calibration_curve.py --recipes nowag-vq2,gptq-w2g64 --sizes 8,32,128 \
        --json benchmarks/results/calibration_curve.json --plot benchmarks/results/calibration_curve.png

Each size is a normal flow run through the content-addressed store: re-running reuses every finished
(model, calibration set, recipe) result, so the script can be stopped and resumed.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def run_sweep(model: str, recipes: list[str], n: int, seqlen: int, eval_windows: int) -> tuple[list[dict], float]:
    cmd = [sys.executable, "-m", "squeezeflow.cli", "sweep", model, "--recipes", ",".join(recipes),
           "--calib-samples", str(n), "--seqlen", str(seqlen), "--eval-windows", str(eval_windows),
           "--no-publish", "--json"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)["results"], time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipes", default="nowag-vq2,gptq-w2g64")
    ap.add_argument("--sizes", default="8,32,128", help="calibration windows, comma-separated")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--plot", help="write a PNG of perplexity against calibration windows here")
    args = ap.parse_args(argv)
    recipes = [r for r in args.recipes.split(",") if r]
    sizes = [int(s) for s in args.sizes.split(",") if s]

    rows: list[dict] = []
    base = None
    for n in sizes:
        results, wall = run_sweep(args.model, recipes, n, args.seqlen, args.eval_windows)
        base = results[0]
        for m in results[1:]:
            rows.append({"recipe": m["recipe"], "calib_windows": n, "perplexity": m["perplexity"],
                         "bits_per_weight": round(m["bits_per_weight"], 4), "sweep_wall_s": round(wall, 1)})
        print(f"calibration {n} x {args.seqlen}: sweep took {wall:.0f} s", file=sys.stderr)
    splits = list(base["perplexity"])

    head = ["recipe", "bits/w", *[f"{s} @{n}" for s in splits for n in sizes]]
    table = [head, ["fp32", f"{base['bits_per_weight']:.2f}", *[f"{base['perplexity'][s]:.3f}" for s in splits for _ in sizes]]]
    for r in recipes:
        mine = {row["calib_windows"]: row for row in rows if row["recipe"] == r}
        bits = next(iter(mine.values()))["bits_per_weight"]
        table.append([r, f"{bits:.3f}", *[f"{mine[n]['perplexity'][s]:.3f}" for s in splits for n in sizes]])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for i, row in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))

    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "seqlen": args.seqlen, "sizes": sizes,
                                               "eval_windows": args.eval_windows, "base": base["perplexity"],
                                               "rows": rows}, indent=1, sort_keys=True) + "\n")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(splits), figsize=(5 * len(splits), 3.6))
        for ax, split in zip(axes if len(splits) > 1 else [axes], splits):
            for r in recipes:
                pts = sorted((row["calib_windows"], row["perplexity"][split]) for row in rows if row["recipe"] == r)
                ax.plot(*zip(*pts), marker="o", label=r)
            ax.axhline(base["perplexity"][split], color="grey", ls="--", lw=1, label="fp32")
            ax.set_xscale("log", base=2)
            ax.set_xlabel(f"calibration windows (x {args.seqlen} tokens)")
            ax.set_ylabel(f"perplexity ({split})")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110, metadata={"Software": None})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
