"""The memory plan's estimate against a measured run: peak RSS of the trunk's stages (plain calls, no Prefect)
on a model, next to what `squeezeflow/memory_plan.py` predicted at preflight. A benchmark, not a test: RSS
depends on the machine and on what else the process has loaded.

    .venv/bin/python -P benchmarks/memory_plan_check.py --recipes rtn-w4g64,gptq-w4g64-act-mse \\
        --json benchmarks/results/memory_plan_check.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, shutil, sys, tempfile, time
from squeezeflow import memory_plan, pipeline
from squeezeflow.config import CalibrationSpec, EvalSpec, ModelRef
from squeezeflow.models import load_config
from squeezeflow.store import LocalStore
model, recipe, n, windows = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
job = pipeline.preflight(ModelRef(ref=model), recipe, CalibrationSpec(n_samples=n), EvalSpec(max_windows=windows))
plan = memory_plan.plan(job, load_config(job.model.path))
d, t = tempfile.mkdtemp(), time.time()
try:
    pipeline.run_job(job, LocalStore(d))
finally:
    shutil.rmtree(d)
print(json.dumps({"recipe": recipe, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "estimate_bytes": plan["peak"]["bytes"], "estimate_stage": plan["peak"]["stage"],
                  "wall_s": round(time.time() - t, 1)}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipes", default="rtn-w4g64,gptq-w4g64-act-mse")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = []
    for recipe in args.recipes.split(","):  # one fresh process per recipe: ru_maxrss is per process
        p = subprocess.run([sys.executable, "-P", "-c", CHILD, args.model, recipe, str(args.calib_samples),
                            str(args.eval_windows)], capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(p.stderr[-3000:])
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    print(f"{'recipe':<24}{'peak RSS MiB':>14}{'estimate MiB':>14}  stage")
    for r in rows:
        print(f"{r['recipe']:<24}{r['peak_rss_bytes'] >> 20:>14}{r['estimate_bytes'] >> 20:>14}  {r['estimate_stage']}")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "calib_samples": args.calib_samples,
                                         "eval_windows": args.eval_windows, "rows": rows}, indent=2) + "\n")
    return 0 if all(r["peak_rss_bytes"] <= r["estimate_bytes"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
