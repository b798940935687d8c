"""Statistics accumulated in fp32 instead of fp64, on the real model: GPTQ W3 and Wanda perplexity.

`ComputeSpec.stats_dtype` picks the precision every hook collector (XᵀX, its diagonal, ...) sums in; the
default is fp64. Each recipe runs twice, fp64 and fp32 statistics, everything else equal (cpu, fp32 blocks,
the same calibration windows), through the pipeline's stages as plain calls like ggd_sweep.py, in a fresh
temporary artifact store so that no earlier run's statistics or blocks are reused and the wall times are real.
The packed checkpoint is evaluated on both held-out splits; the table gives each run's perplexity, its change
against the same recipe's fp64 run, and the wall time of the statistics pass, compress + pack, and evaluation
(a run whose packed bytes equal an earlier run's reuses that run's metrics instead of evaluating again).
gptq-w3g64 is sequential: its XᵀX is collected on the fly (stages/compress.py `_collector_options`);
wanda-p50 is per-block: its diag XᵀX comes from the dense statistics pass (stats.collect).

    .venv/bin/python -P benchmarks/stats_dtype.py --json benchmarks/results/stats_dtype.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "stats_dtype.json"


def run_one(store, args, recipe: str, stats_dtype: str, calib_spec, eval_spec, evaluated: dict) -> dict:
    """One recipe with one statistics dtype: perplexity per split and the wall time of each stage.
    `evaluated`: metrics by packed sha256, so a run whose bytes equal an earlier one's skips evaluation."""
    from squeezeflow import pipeline
    from squeezeflow.config import ComputeSpec, ModelRef

    compute = ComputeSpec(device="cpu", dtype="fp32", stats_dtype=stats_dtype)
    t0 = time.perf_counter()
    plan = pipeline.preflight(ModelRef(ref=args.model), recipe, calib_spec, eval_spec, compute)
    calib = pipeline.calibrate(store, plan.model, plan.calibration)
    t1 = time.perf_counter()
    pipeline.statistics(store, plan.model, calib, plan.statistics)  # the dense pass (hdiag; wanda's input)
    t2 = time.perf_counter()
    _, packed = pipeline.compress_to_packed(store, plan)
    t3 = time.perf_counter()
    # into the temporary store's folder (the default is the scratch dir, which would outlive this run)
    if packed.sha256 in evaluated:  # the same packed bytes as an earlier run: the same metrics, not re-measured
        m, reused = evaluated[packed.sha256], True
    else:
        where = store.materialize(packed, Path(store.root) / "trees" / packed.sha256)
        m, reused = pipeline.evaluate_path(where, plan.model, eval_spec, recipe), False
        evaluated[packed.sha256] = m
    t4 = time.perf_counter()
    return {"recipe": recipe, "stats_dtype": stats_dtype, "perplexity": m["perplexity"], "kl": m["kl"],
            "bits_per_weight": m.get("bits_per_weight"), "packed_sha256": packed.sha256,
            "evaluation_reused": reused,
            "statistics": list(plan.statistics), "method": plan.recipe.methods[0].model_dump(mode="json"),
            "seconds": {"calibrate": round(t1 - t0, 1), "statistics": round(t2 - t1, 1),
                        "compress_pack": round(t3 - t2, 1), "evaluate": round(t4 - t3, 1),
                        "total": round(t4 - t0, 1)}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipes", default="gptq-w3g64,wanda-p50")
    ap.add_argument("--stats-dtypes", default="fp64,fp32", help="the first is the reference of the Δ columns")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--kl-windows", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=str(RESULTS), help="write the results here")
    args = ap.parse_args(argv)

    import torch

    from squeezeflow import pipeline
    from squeezeflow.config import CalibrationSpec, EvalSpec, ModelRef
    from squeezeflow.store import open_store
    from squeezeflow.trees import remove

    torch.set_num_threads(args.threads)
    calib_spec = CalibrationSpec(n_samples=args.calib_samples)
    eval_spec = EvalSpec(max_windows=args.eval_windows, kl_windows=args.kl_windows)
    dtypes = [d for d in args.stats_dtypes.split(",") if d]
    results = {"command": " ".join(["benchmarks/stats_dtype.py", *(sys.argv[1:] if argv is None else argv)]),
               "model": args.model, "calibration": calib_spec.model_dump(mode="json"),
               "evaluation": eval_spec.model_dump(mode="json"), "threads": args.threads,
               "torch": torch.__version__, "stats_dtypes": dtypes, "runs": {}}
    path = Path(args.json)
    root = Path(tempfile.mkdtemp(prefix="stats-dtype-store-"))
    try:
        store = open_store(str(root))
        evaluated: dict[str, dict] = {}
        plan = pipeline.preflight(ModelRef(ref=args.model), "rtn-w4g64", calib_spec, eval_spec)
        t = time.perf_counter()
        base = pipeline.evaluate_path(Path(plan.model.path), plan.model, eval_spec, "fp32")
        results["runs"]["fp32"] = {"recipe": "fp32", "stats_dtype": None, "perplexity": base["perplexity"],
                                   "seconds": {"evaluate": round(time.perf_counter() - t, 1)}}
        print(f"fp32 dense: {base['perplexity']}", file=sys.stderr)
        for recipe in [r for r in args.recipes.split(",") if r]:
            for d in dtypes:
                m = run_one(store, args, recipe, d, calib_spec, eval_spec, evaluated)
                results["runs"][f"{recipe}/{d}"] = m
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(results, indent=1, sort_keys=True, default=str))
                print(f"{recipe}/{d}: {m['perplexity']} ({m['seconds']['total']} s)", file=sys.stderr)
    finally:
        remove(root)  # materialized trees are read-only: trees.remove makes them writable first
    print(table(results, dtypes[0]))
    return 0


def table(results: dict, reference: str) -> str:
    """Perplexity per split; Δ against the same recipe's `reference` statistics dtype (and the dense model)."""
    runs = results["runs"]
    splits = sorted(runs["fp32"]["perplexity"])
    head = ["run", "stats dtype", *[f"ppl {s}" for s in splits], *[f"Δ vs {reference} {s}" for s in splits],
            "same packed bytes", "statistics s", "compress+pack s", "evaluate s", "total s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = {d: i for i, d in enumerate(results.get("stats_dtypes", [reference]))}  # the JSON's keys are sorted
    for name, m in sorted(runs.items(), key=lambda kv: (kv[0] != "fp32", kv[1]["recipe"],
                                                         order.get(kv[1]["stats_dtype"], len(order)))):
        ppl, sec = m["perplexity"], m["seconds"]
        ref = runs.get(f"{m['recipe']}/{reference}")
        same = "-" if ref is None or ref is m else ("yes" if ref["packed_sha256"] == m["packed_sha256"] else "no")
        row = [m["recipe"], m["stats_dtype"] or "-", *[f"{ppl[s]:.3f}" for s in splits],
               *[f"{100 * (ppl[s] / ref['perplexity'][s] - 1):+.3f}%" if ref is not None else "-" for s in splits],
               same, *[str(sec.get(k, "-")) for k in ("statistics", "compress_pack")],
               "reused (same bytes)" if m.get("evaluation_reused") else str(sec["evaluate"]), str(sec.get("total", "-"))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
