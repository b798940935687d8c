"""GGD shape and scale of every weight matrix of a checkpoint (moment matching, squeezeflow.methods.gg.ggd):
a markdown table, a JSON file and a plot of ν per decoder layer.

    .venv/bin/python benchmarks/ggd_fit.py [--model smollm2-135m] [--out benchmarks/results/ggd_fit]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path



def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="prepared short name or local HF directory")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ggd_fit"), help="path prefix")
    args = ap.parse_args(argv)

    from squeezeflow.methods.gg import ggd
    from squeezeflow.models import resolve_model

    path = resolve_model(args.model).path
    rows = ggd.model_table(path)
    kinds: dict[str, list[float]] = {}
    for r in rows:
        parts = r["name"].split(".")
        kind = ".".join(parts[3:-1]) if len(parts) > 3 and parts[1] == "layers" else r["name"]
        kinds.setdefault(kind, []).append(r["shape"])
    summary = {k: {"median": round(statistics.median(v), 3), "min": round(min(v), 3), "max": round(max(v), 3),
                   "tensors": len(v)} for k, v in sorted(kinds.items())}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"model": args.model, "summary": summary, "tensors": rows},
                                                   indent=1, sort_keys=True))
    head = "| tensor kind | median ν | min ν | max ν | tensors |\n|---|---|---|---|---|\n"
    table = head + "".join(f"| {k} | {s['median']} | {s['min']} | {s['max']} | {s['tensors']} |\n"
                           for k, s in summary.items())
    out.with_suffix(".md").write_text(f"# GGD fits of {args.model}\n\n{table}\n## Every tensor\n\n{ggd.table_markdown(rows)}")
    out.with_suffix(".png").write_bytes(ggd.shape_plot(rows))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
