"""Compress the real model under a hard memory limit well below its fp32 size (layer streaming).

1. The fixed overhead O: the peak RSS of the *same* run (same recipe, calibration text, window count
   and length, same code path) on a tiny twin of the model (2 blocks, hidden 64, the model's own
   tokenizer and vocabulary). It holds everything that does not grow with the model: the interpreter,
   torch / transformers code, the tokenizer and the tokenized corpus, allocator workspaces. The peak of
   a process that only imports and loads the tokenizer is printed beside it for reference.
2. A child runs calibrate -> saliency -> compress -> pack (plain pipeline calls, no Prefect) on the real
   model inside a cgroup (v1 memory controller, root) whose limit is O + half the model's fp32 weight
   bytes, so the process is OOM-killed if it ever holds more than half the model beyond the overhead.
   Evaluation is not part of it: perplexity of the fp32 base needs the whole model in memory.
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
from squeezeflow.models import load_tokenizer, resolve_model
from squeezeflow.store import LocalStore
model = resolve_model(args["model"])
load_tokenizer(model.path)
overhead = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out = {"import_rss": overhead}
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


def tiny_twin(model_path: Path, dest: Path) -> Path:
    """The model's architecture at 2 blocks and hidden 64, random weights, its own tokenizer and vocab."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    config.update({"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "head_dim": 16})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(dest, safe_serialization=True)
    for f in model_path.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config")):
            shutil.copyfile(f, dest / f.name)
    return dest


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
    base = {"model": str(model.path), "recipe": args.recipe, "calib_samples": args.calib_samples}
    rc, imports, err = run_child({**base, "run": False}, None)
    with tempfile.TemporaryDirectory() as tmp:
        twin = tiny_twin(Path(model.path), Path(tmp) / "twin")
        rc2, twin_run, err2 = run_child({**base, "model": str(twin), "run": True}, None)
    if rc or rc2 or imports is None or twin_run is None:
        print(err, err2, file=sys.stderr)
        return 1
    overhead = {"overhead_rss": twin_run["peak_rss"], "import_rss": imports["import_rss"]}
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
    result = {**base, "model": args.model, "fp32_weight_bytes": fp32_bytes, "overhead_rss": overhead["overhead_rss"],
              "import_rss": overhead["import_rss"], "limit_bytes": limit,
              "limit_enforced": cgroup is not None, "exit_code": rc, "oom_kills": oom,
              "peak_rss": out and out["peak_rss"], "cgroup_peak_bytes": cg_peak,
              "packed_bytes": out and out.get("packed_bytes")}
    print(f"model fp32 weights      {fp32_bytes / mib:8.1f} MiB")
    print(f"imports + tokenizer only {overhead['import_rss'] / mib:8.1f} MiB  (reference)")
    print(f"fixed overhead          {overhead['overhead_rss'] / mib:8.1f} MiB  (peak RSS of the same run on a "
          f"2-block, hidden-64 twin)")
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
