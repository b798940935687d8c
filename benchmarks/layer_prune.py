"""Layer pruning on the real model without retraining: TRSP, its two ablations, ShortGPT, SLEB-style and
last layers at the same removed-layer count, plus one chained recipe (TRSP, then a quantization method).

    .venv/bin/python benchmarks/layer_prune.py [--recipes trsp-25,shortgpt-25,...] [--calib-samples 32]
        [--steps --lr --batch-size --lambda1 --stage2-steps --stage2-lr --lambda2 --windows --seqlen
         (TRSP knobs; default: the trsp preset's)] [--sleb-windows 4 --sleb-seqlen 128]
        [--chain rtn-w4g64]

Runs the pipeline stages as plain calls (calibrate -> [structural rounds] -> [saliency -> compress -> pack]
-> evaluate) on the default artifact store, so finished rounds and steps are reused by a rerun. Prints a
table and writes benchmarks/results/layer_prune.json (perplexity on both held-out splits, KL and top-1
agreement vs the base model, removed layers, seconds).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from squeezeflow import pipeline
from squeezeflow.config import CalibrationSpec, EvalSpec, ModelRef
from squeezeflow.methods.layers import TRSPConfig
from squeezeflow.recipes import preset
from squeezeflow.settings import store_uri
from squeezeflow.store import open_store

RESULTS = Path(__file__).parent / "results" / "layer_prune.json"


def configured(name: str, args) -> pipeline.Recipe:
    """The preset with the benchmark's CPU-budget knobs applied to its structural steps."""
    recipe = preset(name)
    methods = []
    for m in recipe.methods:
        if m.method == "trsp":
            m = m.model_copy(update={"steps": args.steps, "windows": args.windows, "seqlen": args.seqlen, "lr": args.lr,
                                     "batch_size": args.batch_size, "stage2_lr": args.stage2_lr,
                                     "lambda1": args.lambda1, "lambda2": args.lambda2,
                                     **({"stage2_steps": args.stage2_steps} if m.stage2_steps else {})})
        elif m.method == "sleb":
            m = m.model_copy(update={"windows": args.sleb_windows, "seqlen": args.sleb_seqlen})
        methods.append(m)
    return recipe.model_copy(update={"methods": methods})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipes", default="lastlayers-25,shortgpt-25,sleb-25,trsp-25,trsp-25-no-stage2,trsp-25-no-iter")
    ap.add_argument("--chain", default="rtn-w4g64", help="weight method run after trsp-25 ('' = skip)")
    ap.add_argument("--calib-samples", type=int, default=32)
    trsp = TRSPConfig.model_fields   # TRSP knobs default to the preset's values
    ap.add_argument("--steps", type=int, default=trsp["steps"].default, help="TRSP gate steps per round")
    ap.add_argument("--lr", type=float, default=trsp["lr"].default, help="TRSP gate learning rate (Adam)")
    ap.add_argument("--batch-size", type=int, default=trsp["batch_size"].default, help="TRSP windows per step (both stages)")
    ap.add_argument("--lambda1", type=float, default=trsp["lambda1"].default, help="TRSP L1 weight on the gates (stage 1)")
    ap.add_argument("--lambda2", type=float, default=trsp["lambda2"].default, help="TRSP transfer penalty weight (stage 2)")
    ap.add_argument("--stage2-steps", type=int, default=trsp["stage2_steps"].default)
    ap.add_argument("--stage2-lr", type=float, default=trsp["stage2_lr"].default, help="TRSP transfer learning rate (AdamW)")
    ap.add_argument("--windows", type=int, default=trsp["windows"].default)
    ap.add_argument("--seqlen", type=int, default=trsp["seqlen"].default)
    ap.add_argument("--sleb-windows", type=int, default=4)
    ap.add_argument("--sleb-seqlen", type=int, default=128)
    ap.add_argument("--kl-windows", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()

    store = open_store(store_uri())
    calibration = CalibrationSpec(n_samples=args.calib_samples, seqlen=512, seed=0)
    evaluation = EvalSpec(kl_windows=args.kl_windows)
    names = [n for n in args.recipes.split(",") if n]
    if args.chain:
        names.append(f"trsp-25+{args.chain}")
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    results["settings"] = {k: v for k, v in vars(args).items() if k != "out"}
    rows = results.setdefault("rows", {})

    first = pipeline.preflight(ModelRef(ref=args.model), configured(names[0], args), calibration, evaluation)
    calib = pipeline.calibrate(store, first.model, calibration)
    if "fp32" not in rows:
        started = time.perf_counter()
        base = store.get_json(pipeline.evaluate(store, first.model, None, evaluation, "fp32"))
        rows["fp32"] = {"perplexity": base["perplexity"], "removed": [], "seconds": round(time.perf_counter() - started, 1)}
        out.write_text(json.dumps(results, indent=1, sort_keys=True))
    for name in names:
        plan = pipeline.preflight(ModelRef(ref=args.model), configured(name, args), calibration, evaluation)
        started = time.perf_counter()
        out = pipeline.run_job(plan, store, until="pack" if plan.weight_recipe else "restructure")
        packed, steps = out["packed"], out["steps"]
        compress_s = time.perf_counter() - started
        metrics = store.get_json(pipeline.evaluate(store, plan.model, packed, evaluation, name))
        row = {"perplexity": metrics["perplexity"], "kl": metrics["kl"], "bits_per_weight": metrics["bits_per_weight"],
               "removed": steps[0].record["removed"], "record": steps[0].record,
               "config": [m.model_dump(mode="json") for m in plan.recipe.methods],
               "compress_seconds": round(compress_s, 1), "seconds": round(time.perf_counter() - started, 1)}
        if plan.structural < len(plan.recipe.methods):
            from squeezeflow.stages.restructure import step_metrics

            row["after_structural"] = step_metrics(store, plan.model, steps[-1], evaluation)["perplexity"]
        rows[name] = row
        out.write_text(json.dumps(results, indent=1, sort_keys=True))
        print(f"{name}: {row['perplexity']} removed {row['removed']} ({row['seconds']} s)", flush=True)

    splits = list(evaluation.splits)
    print("\n| recipe | " + " | ".join(f"ppl {s}" for s in splits) + " | removed layers | s |")
    print("|---" * (len(splits) + 3) + "|")
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r['perplexity'][s]:.3f}" for s in splits)
              + f" | {r['removed']} | {r['seconds']} |")


if __name__ == "__main__":
    main()
