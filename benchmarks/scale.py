"""Compression at real model shapes: per stage wall time, peak host RSS, peak device memory and bytes written.

Builds a random checkpoint (bf16, sharded like the Hub's) with a real model's shapes — Llama-3.2-1B at full
depth, Llama-3-8B and -70B with a few blocks (--blocks) — and runs one recipe through the trunk's plan with
plain stage calls in a child process, sampling its RSS every 20 ms and attributing each sample to the stage
running then (dag.run's on_stage). With --cli the same job runs through `squeezeflow compress` (the Prefect
flow, evaluation included) and only the whole run's peak is reported (ru_maxrss of the CLI process).

    .venv/bin/python -P benchmarks/scale.py --shape 1b --recipe rtn-w4g64 --json benchmarks/results/scale_1b_rtn.json
    .venv/bin/python -P benchmarks/scale.py --shape 8b --blocks 2 --recipe gptq-w4g64

For a cut model the table adds a projection to full depth: per-block stage times scale with the block
count; the peaks do not (one block at a time), except what the memory plan says grows with depth.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 1 << 30
SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab, tied
    "1b": (2048, 8192, 16, 32, 8, 128256, True),
    "8b": (4096, 14336, 32, 32, 8, 128256, False),
    "70b": (8192, 28672, 80, 64, 8, 128256, False),
    # The fixed overhead's yardstick (--overhead): 2 blocks 64 wide, the same 128k vocabulary and tokenizer.
    "tiny": (64, 256, 2, 4, 2, 128256, True),
}
PER_BLOCK = ("statistics", "compress-block", "compress-sequential", "pack")  # stages whose time grows with depth

CHILD = r"""
import json, os, sys, threading, time, tempfile
import psutil
args = json.loads(sys.argv[1])
from squeezeflow import pipeline
from squeezeflow.config import CalibrationSpec, ComputeSpec, EvalSpec, ModelRef
from squeezeflow.store import LocalStore
proc, current, peaks, times, starts = psutil.Process(), ["preflight"], {}, {}, {"preflight": time.perf_counter()}
cuda = args["device"].startswith("cuda")
if cuda:
    import torch
def sample():
    while True:
        rss = proc.memory_info().rss
        peaks[current[0]] = max(peaks.get(current[0], 0), rss)
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
store_dir = args["store"]
written = {}
def du():
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(store_dir) for f in fs)
last = [0]
def on_stage(stage):
    now = time.perf_counter()
    prev = current[0]
    times[prev] = times.get(prev, 0) + now - starts[prev]
    size = du(); written[prev] = written.get(prev, 0) + size - last[0]; last[0] = size
    kind = stage.kind
    current[0] = kind
    starts[kind] = now
    if cuda:
        torch.cuda.reset_peak_memory_stats()
job = pipeline.preflight(ModelRef(ref=args["model"]), args["recipe"],
                         CalibrationSpec(n_samples=args["calib"], seqlen=args["seqlen"]),
                         EvalSpec(seqlen=args["seqlen"], max_windows=args["eval_windows"], kl_windows=args["kl_windows"]),
                         ComputeSpec(device=args["device"], dtype=args["dtype"]))
from squeezeflow import memory_plan
from squeezeflow.models import load_config
estimate = memory_plan.plan(job, load_config(job.model.path))
pipeline.run_job(job, LocalStore(store_dir), on_stage=on_stage)
on_stage(type("S", (), {"kind": "end"}))
peaks.pop("end", None)
print(json.dumps({"times": times, "peaks": peaks, "written": written, "estimate": estimate}))
"""


def build(dest: Path, shape: str, blocks: int | None, tokenizer_src: Path, shard_bytes: int = 2 * 10**9) -> dict:
    """A random bf16 checkpoint with the shape's tensors, written shard by shard (never whole in memory)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    hidden, inter, layers, heads, kv, vocab, tied = SHAPES[shape]
    layers = blocks or layers
    head_dim = hidden // heads
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                         tie_word_embeddings=tied, dtype="bfloat16", rope_theta=500000.0)
    g = torch.Generator().manual_seed(0)
    tensors = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors += [(p + "self_attn.q_proj.weight", (heads * head_dim, hidden)),
                    (p + "self_attn.k_proj.weight", (kv * head_dim, hidden)),
                    (p + "self_attn.v_proj.weight", (kv * head_dim, hidden)),
                    (p + "self_attn.o_proj.weight", (hidden, heads * head_dim)),
                    (p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
                    (p + "mlp.down_proj.weight", (hidden, inter)),
                    (p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
    tensors.append(("model.norm.weight", (hidden,)))
    if not tied:
        tensors.append(("lm_head.weight", (vocab, hidden)))
    dest.mkdir(parents=True)
    shards, current, size, total = [], {}, 0, 0
    for name, shp in tensors:
        t = torch.ones(shp) if len(shp) == 1 else torch.randn(*shp, generator=g) * (shp[1] ** -0.5)
        t = t.to(torch.bfloat16)
        if current and size + t.numel() * 2 > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += t.numel() * 2
        total += t.numel() * 2
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, dest / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    config.save_pretrained(dest)
    AutoTokenizer.from_pretrained(tokenizer_src).save_pretrained(dest)
    return {"layers": layers, "full_layers": SHAPES[shape][2], "bf16_bytes": total,
            "params": total // 2, "shards": len(shards)}


def run_library(model: Path, store: Path, args) -> dict:
    payload = {"model": str(model), "recipe": args.recipe, "calib": args.calib, "seqlen": args.seqlen,
               "eval_windows": args.eval_windows, "kl_windows": args.kl_windows, "device": args.device,
               "dtype": args.dtype, "store": str(store)}
    p = subprocess.run([sys.executable, "-P", "-c", CHILD, json.dumps(payload)], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(p.stderr[-4000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


# Runs the CLI and reports its own children's peak: a fresh parent per run, so runs do not share ru_maxrss.
_MEASURE = "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); " \
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); sys.exit(r.returncode)"


def run_cli(model: Path, store: Path, args) -> dict:
    cmd = [sys.executable, "-P", "-m", "squeezeflow.cli", "compress", str(model), "--recipe", args.recipe,
           "--calib-samples", str(args.calib), "--seqlen", str(args.seqlen), "--device", args.device,
           "--dtype", args.dtype, "--store", str(store), "--no-publish", "--eval-windows", str(args.eval_windows)]  # KL: the CLI's default (on)
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(p.stderr[-4000:])
    return {"wall_s": round(wall, 1), "peak_rss_bytes": int(p.stdout.strip().splitlines()[-1])}


def measure(shape: str, blocks: int | None, args) -> tuple[dict, dict]:
    """(the checkpoint's numbers, the run's) for one shape, in a temporary directory removed afterwards."""
    from squeezeflow.models import prepare_model

    root = Path(tempfile.mkdtemp(prefix="sqf-scale-"))
    try:
        info = build(root / "model", shape, blocks, prepare_model("smollm2-135m").path)
        if args.plan_only:
            return info, {"gpu_projection": gpu_projection(root / "model", args)}
        return info, (run_cli if args.cli else run_library)(root / "model", root / "store", args)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def gpu_projection(model: Path, args) -> dict:
    """The memory plan of this job on one GPU in bf16 (no GPU needed: the plan reads shapes and settings):
    the device's peak, the host's share beside it, and the stage it comes from."""
    from squeezeflow import memory_plan, pipeline
    from squeezeflow.config import CalibrationSpec, ComputeSpec, EvalSpec, ModelRef
    from squeezeflow.models import load_config

    # This machine's RAM is not the question: plan as if the host had room (the GPU job's host share is below).
    os.environ[memory_plan.LIMIT_ENV] = "1024TiB"
    job = pipeline.preflight(ModelRef(ref=str(model)), args.recipe, CalibrationSpec(n_samples=args.calib, seqlen=args.seqlen),
                             EvalSpec(seqlen=args.seqlen, max_windows=args.eval_windows, kl_windows=args.kl_windows),
                             ComputeSpec(device="cpu", dtype="bf16"))
    gpu = job.on(ComputeSpec(device="cuda:0", dtype="bf16"))
    s = memory_plan.shapes(model, load_config(model))
    top = max(memory_plan.stage_peaks(s, gpu), key=lambda p: p.bytes)
    return {"device_peak_bytes": top.bytes - memory_plan.FIXED_OVERHEAD, "device_stage": top.stage,
            "host_peak_bytes": memory_plan.host_beside_device(s, gpu)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--blocks", type=int, help="cut to this many decoder blocks (default: full depth)")
    ap.add_argument("--recipe", default="rtn-w4g64")
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=2)
    ap.add_argument("--kl-windows", type=int, default=2, help="KL windows per split (library runs; the CLI keeps its default, on)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--cli", action="store_true", help="run `squeezeflow compress` instead (whole-run peak only)")
    ap.add_argument("--overhead", action="store_true",
                    help="first run the same job on the 2-block tiny shape and report the peak above it")
    ap.add_argument("--plan-only", action="store_true",
                    help="run nothing: print the memory plan of the job on one GPU in bf16 (device and host peaks)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    overhead = None
    if args.overhead:  # the same run on the 2-block, 64-wide model first: what does not grow with the model
        _, tiny = measure("tiny", None, args)
        overhead = tiny["peak_rss_bytes"] if args.cli else max(tiny["peaks"].values())
    info, run = measure(args.shape, args.blocks, args)
    result = {"shape": args.shape, "recipe": args.recipe, "device": args.device, "dtype": args.dtype,
              "calib": f"{args.calib}x{args.seqlen}", "eval_windows": args.eval_windows, **info, **run,
              "max_blocks_env": os.environ.get("SQUEEZEFLOW_MAX_BLOCKS"), "fixed_overhead_bytes": overhead}
    w = info["bf16_bytes"]
    print(f"{args.shape} ({info['params'] / 1e9:.2f} B params, {info['layers']}/{info['full_layers']} blocks, "
          f"bf16 {w / GIB:.2f} GiB), {args.recipe}, {args.device} {args.dtype}")
    if args.plan_only:
        g = run["gpu_projection"]
        print(f"on one GPU, bf16, per the memory plan: device peak {g['device_peak_bytes'] / GIB:.2f} GiB "
              f"({g['device_stage']}), host beside it {g['host_peak_bytes'] / GIB:.2f} GiB; one block at a time, so "
              f"the same at full depth ({info['full_layers']} blocks)")
    elif args.cli:
        print(f"CLI flow: {run['wall_s']} s, peak RSS {run['peak_rss_bytes'] / GIB:.2f} GiB "
              f"= {run['peak_rss_bytes'] / w:.2f} x bf16 weights")
    if overhead is not None and not args.plan_only:
        peak = run["peak_rss_bytes"] if args.cli else max(run["peaks"].values())
        result["above_overhead_x_weights"] = round((peak - overhead) / w, 3)
        print(f"fixed overhead (the same run on the 2-block tiny shape) {overhead / GIB:.2f} GiB; peak above it "
              f"{(peak - overhead) / GIB:.2f} GiB = {(peak - overhead) / w:.2f} x bf16 weights")
    elif not args.cli and not args.plan_only:
        scale = info["full_layers"] / info["layers"]
        print(f"{'stage':<16}{'wall s':>9}{'peak RSS GiB':>14}{'written MiB':>13}{'full-depth s':>14}")
        for stage, t in run["times"].items():
            full = t * scale if stage in PER_BLOCK else t
            print(f"{stage:<16}{t:9.1f}{run['peaks'].get(stage, 0) / GIB:14.2f}"
                  f"{run['written'].get(stage, 0) / 2**20:13.1f}{full:14.1f}")
        peak = max(run["peaks"].values())
        est = run["estimate"]["peak"]
        print(f"peak RSS {peak / GIB:.2f} GiB = {peak / w:.2f} x bf16 weights; memory plan's estimate "
              f"{est['bytes'] / GIB:.2f} GiB ({est['stage']})")
        result["projected_full_depth_s"] = round(sum(t * (scale if s in PER_BLOCK else 1)
                                                     for s, t in run["times"].items()), 1)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
