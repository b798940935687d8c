"""Compress the real model under a hard memory limit well below its fp32 size (layer streaming).

1. A child process imports everything a compression needs (torch, transformers, the pipeline, the
   tokenizer) and reports its peak RSS: the fixed overhead O of any Python process doing this work.
2. A second child runs calibrate -> saliency -> compress -> pack (plain pipeline calls, no Prefect) inside a
   cgroup (v1 memory controller, root) whose limit is O + half the model's fp32 weight bytes, so the
   process is OOM-killed if it ever holds more than half the model beyond the overhead. Evaluation is not
   part of it: perplexity of the fp32 base needs the whole model in memory.
3. Prints peak RSS against the model's fp32 size and writes JSON.

    .venv/bin/python -P benchmarks/memory_bound.py --recipe rtn-w4g64 --calib-samples 32 \\
        --json benchmarks/results/memory_bound.json

Without a writable cgroup the limit is not enforced; the peak is still measured and the output says so.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")

CHILD = r"""
import json, resource, sys, tempfile
args = json.loads(sys.argv[1])
from squeezeflow import pipeline
from squeezeflow.config import CalibrationSpec, EvalSpec, ModelRef
from squeezeflow.models import load_tokenizer, prepare_model
from squeezeflow.store import LocalStore
model = prepare_model(args["model"])
load_tokenizer(model.path)
overhead = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out = {"overhead_rss": overhead}
if args["run"]:
    plan = pipeline.preflight(ModelRef(ref=args["model"]), args["recipe"],
                              CalibrationSpec(n_samples=args["calib_samples"]), EvalSpec())
    store = LocalStore(tempfile.mkdtemp(prefix="sqf-membound-"))
    calib = pipeline.calibrate(store, plan.model, plan.calibration)
    stats = pipeline.saliency(store, plan.model, calib, plan.statistics)
    blocks, packed = pipeline.compress_to_packed(store, plan, calib, stats)
    out["packed_bytes"] = sum(f.stat().st_size for f in store.materialize(packed).glob("*.safetensors"))
out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(out))
"""


def run_child(args: dict, cgroup: Path | None) -> tuple[int, dict | None, str]:
    def enter_cgroup():
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    p = subprocess.run([sys.executable, "-P", "-c", CHILD, json.dumps(args)], capture_output=True, text=True,
                       preexec_fn=enter_cgroup)
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    return p.returncode, json.loads(lines[-1]) if lines else None, p.stderr[-3000:]


def make_cgroup(limit: int) -> Path | None:
    path = CGROUP_ROOT / f"squeezeflow-bound-{os.getpid()}"
    try:
        path.mkdir()
        (path / "memory.limit_in_bytes").write_text(str(limit))
        swap = path / "memory.memsw.limit_in_bytes"
        if swap.exists():
            swap.write_text(str(limit))  # no escape into swap
        return path
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipe", default="rtn-w4g64")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--no-limit", action="store_true", help="measure the peak without enforcing the limit")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    from squeezeflow.models import prepare_model

    model = prepare_model(args.model)
    fp32_bytes = sum(f.stat().st_size for f in Path(model.path).glob("*.safetensors"))
    base = {"model": args.model, "recipe": args.recipe, "calib_samples": args.calib_samples}
    rc, overhead, err = run_child({**base, "run": False}, None)
    if rc or overhead is None:
        print(err, file=sys.stderr)
        return 1
    limit = overhead["overhead_rss"] + fp32_bytes // 2
    cgroup = None if args.no_limit else make_cgroup(limit)
    try:
        rc, out, err = run_child({**base, "run": True}, cgroup)
        cg_peak = int((cgroup / "memory.max_usage_in_bytes").read_text()) if cgroup else None
        oom = int(next((line.split()[1] for line in (cgroup / "memory.oom_control").read_text().splitlines()
                        if line.startswith("oom_kill ")), 0)) if cgroup else None
    finally:
        if cgroup is not None:
            cgroup.rmdir()
    mib = 2**20
    result = {**base, "fp32_weight_bytes": fp32_bytes, "overhead_rss": overhead["overhead_rss"], "limit_bytes": limit,
              "limit_enforced": cgroup is not None, "exit_code": rc, "oom_kills": oom,
              "peak_rss": out and out["peak_rss"], "cgroup_peak_bytes": cg_peak,
              "packed_bytes": out and out.get("packed_bytes")}
    print(f"model fp32 weights      {fp32_bytes / mib:8.1f} MiB")
    print(f"fixed overhead (imports, tokenizer; peak RSS of a process that compresses nothing) "
          f"{overhead['overhead_rss'] / mib:.1f} MiB")
    print(f"limit = overhead + fp32/2 {limit / mib:8.1f} MiB  ({'enforced by a cgroup' if cgroup else 'NOT enforced: no writable cgroup'})")
    if out:
        extra = out["peak_rss"] - overhead["overhead_rss"]
        result["peak_over_overhead_fraction_of_fp32"] = round(extra / fp32_bytes, 4)
        print(f"peak RSS                {out['peak_rss'] / mib:8.1f} MiB  = overhead + {extra / mib:.1f} MiB "
              f"({extra / fp32_bytes:.1%} of the fp32 model)")
        print(f"packed model            {out['packed_bytes'] / mib:8.1f} MiB")
    print(f"exit code {rc}" + (f", OOM kills {oom}" if oom is not None else "") + (f"\n{err}" if rc else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
