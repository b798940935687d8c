"""QUAD / QuaRot accuracy retention against fp32: cloze accuracy and perplexity, one table.

Each recipe goes through the pipeline's stages as plain calls (cached in the artifact store, so a
recipe a sweep already compressed is only re-packed), then the packed checkpoint and the fp32 model are
evaluated with the same protocol: perplexity on both held-out splits and the two zero-shot cloze tasks
(next sentence, 4-way; last word) built deterministically from held-out text. Retention = quantized /
fp32 for accuracies, fp32 / quantized for perplexities (1.0 = nothing lost). The JSON is rewritten after
every recipe, and a rerun with the same --json and protocol keeps the rows already there. The paper reports 94-96%
zero-shot retention for W4A4 and 98% for W4A4/A8 + PEFT on 7B-scale models.

    .venv/bin/python benchmarks/quad_retention.py --recipes quarot-w4a4,quad-w4a4,quad-w4a4a8,quad-w4a4a8-peft \\
        --calib-samples 64 --cloze-items 200 --json benchmarks/results/quad_retention.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def report(rows: list[dict]) -> str:
    """The markdown table of `rows` (first row: fp32), retention filled into each row."""
    base = rows[0]

    def acc(m: dict, task: str) -> float:
        return m["accuracy"][task].get("acc_norm", m["accuracy"][task]["acc"])

    tasks = sorted(base["accuracy"])
    splits = sorted(base["perplexity"])
    head = ["recipe", "r", "bits/w", *[f"{t}" for t in tasks], *[f"ppl {s}" for s in splits],
            "acc retention", "ppl retention"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in rows:
        acc_ret = sum(acc(m, t) / acc(base, t) for t in tasks) / len(tasks)
        ppl_ret = sum(base["perplexity"][s] / m["perplexity"][s] for s in splits) / len(splits)
        m["retention"] = {"accuracy": round(acc_ret, 4), "perplexity": round(ppl_ret, 4)}
        r = m.get("method", {}).get("r", "-")
        lines.append("| " + " | ".join([m["recipe"], str(r), f"{m['bits_per_weight']:.3f}",
                                         *[f"{acc(m, t):.3f}" for t in tasks],
                                         *[f"{m['perplexity'][s]:.3f}" for s in splits],
                                         f"{acc_ret:.3f}", f"{ppl_ret:.3f}"]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipes", default="quarot-w4a4,quad-w4a4,quad-w4a4a8,quad-w4a4a8-peft")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--cloze-items", type=int, default=200)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    from squeezeflow import pipeline
    from squeezeflow.config import CalibrationSpec, EvalSpec, ModelRef
    from squeezeflow.settings import store_uri
    from squeezeflow.store import open_store

    calib_spec = CalibrationSpec(n_samples=args.calib_samples)
    eval_spec = EvalSpec(max_windows=args.eval_windows, kl_windows=0, cloze_items=args.cloze_items)
    store = open_store(store_uri())
    rows = []
    # Resume: rows a previous run of the same protocol already wrote to --json are kept, not re-measured.
    done = {}
    if args.json and Path(args.json).exists():
        old = json.loads(Path(args.json).read_text())
        if old["calibration"] == calib_spec.model_dump() and old["evaluation"] == eval_spec.model_dump(mode="json"):
            done = {m["recipe"]: m for m in old["results"]}
    if "fp32" in done:
        rows.append(done["fp32"])
    base = rows[0] if rows else None
    for recipe in [r for r in args.recipes.split(",") if r]:
        if recipe in done and base is not None:
            rows.append(done[recipe])
            print(f"{recipe}: kept from {args.json}", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        plan = pipeline.preflight(ModelRef(ref=args.model), recipe, calib_spec, eval_spec)
        calib = pipeline.calibrate(store, plan.model, plan.calibration)
        stats = pipeline.saliency(store, plan.model, calib, plan.statistics)
        _, packed = pipeline.compress_to_packed(store, plan, calib, stats)
        if base is None:
            base = pipeline.evaluate_path(Path(plan.model.path), plan.model, eval_spec, "fp32")
            rows.append(base)
        m = pipeline.evaluate_path(store.materialize(packed), plan.model, eval_spec, recipe)
        m["method"] = plan.recipe.methods[0].model_dump(mode="json")
        m["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(m)
        print(f"{recipe}: {m['perplexity']} ({m['seconds']} s)", file=sys.stderr)
        if args.json:   # after every recipe: a run stopped half-way keeps what it measured
            Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "calibration": calib_spec.model_dump(),
                                                   "evaluation": eval_spec.model_dump(mode="json"), "results": rows,
                                                   "table": report(rows)}, indent=2, sort_keys=True, default=str))

    print(report(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
