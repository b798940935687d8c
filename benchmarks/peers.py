"""Peer baseline: Squeezeflow against llm-compressor on the same model, the same calibration windows and the
same evaluation.

    .venv/bin/python benchmarks/peers.py [--recipes gptq-w4g64,gptq-w3g64,wanda-p50,nowag-p50]
        [--peers gptq-w4g64,gptq-w3g64,wanda-p50,sparsegpt-p50] [--json OUT.json] [--md OUT.md]

What it does, in one invocation:
1. Makes sure llm-compressor has its own virtual environment (it pins transformers<=5.17, ours is newer):
   $SQUEEZEFLOW_CACHE/venvs/llmcompressor with torch==2.13.0 (CPU) and llmcompressor==0.14.0.1. A failed
   install prints pip's error and exits 1.
2. Builds our calibration set exactly as the pipeline does (preflight + calibrate, 64 windows × 512 tokens
   of SOTU 1790–1999, seed 0) in a fresh temporary store and writes its token windows to a safetensors
   file (`input_ids`) that the llm-compressor worker reads: both sides calibrate on identical tokens.
3. Runs each configuration in its own subprocess (wall time of that process; peak RSS is its own VmHWM):
   ours through the plain pipeline functions (preflight -> calibrate -> saliency -> compress -> pack, in a
   fresh temporary store, so nothing comes from a cache), theirs through `oneshot` in
   benchmarks/peer_llmcompressor_worker.py, which writes a dense fake-quantized/pruned HF checkpoint.
   The peer checkpoint is checked here: every decoder linear changed, nothing else did, GPTQ groups hold at
   most 2^bits distinct values, pruned matrices are about 50% zeros.
4. Evaluates every result in a separate subprocess with `pipeline.evaluate_path` (ours: the packed
   directory loaded back through our quantizer; theirs: the dense directory): perplexity on 16 windows of
   512 tokens of each held-out split, KL and top-1 agreement against the fp32 model on 4 windows.
5. Prints the table (and the ratio of our GPTQ perplexity to theirs), writes --json and --md.

Configurations run in pairs (ours, then theirs) so that load from other jobs on the machine hits both
sides alike. `wall s` is the compression subprocess only (imports, model load, calibration statistics,
compression, writing the checkpoint); evaluation is timed separately.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WORKER = Path(__file__).resolve().parent / "peer_llmcompressor_worker.py"
LLMC_SPEC = "llmcompressor==0.14.0.1"
TORCH_SPEC = "torch==2.13.0"
OUR_RECIPES = ("gptq-w4g64", "gptq-w3g64", "wanda-p50", "nowag-p50")
PEER_CONFIGS = ("gptq-w4g64", "gptq-w3g64", "gptq-w4g64-act-mse", "gptq-w3g64-act-mse", "wanda-p50", "sparsegpt-p50")
# Which peer run each of ours is compared with (same row group in the table).
PAIRS = {"gptq-w4g64": "gptq-w4g64", "gptq-w3g64": "gptq-w3g64", "gptq-w4g64-act-mse": "gptq-w4g64-act-mse",
         "gptq-w3g64-act-mse": "gptq-w3g64-act-mse", "wanda-p50": "wanda-p50", "nowag-p50": "sparsegpt-p50"}
GPTQ_CONFIGS = ("gptq-w4g64", "gptq-w3g64", "gptq-w4g64-act-mse", "gptq-w3g64-act-mse")
TARGET_RATIO = 1.02   # acceptance: our GPTQ perplexity within 2% of llm-compressor's
TARGET_LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.[a-z_]+_proj\.weight")


# ------------------------------------------------------------------------------------------------
# Specs shared by every subprocess (kept here so both sides and the evaluation agree by construction)
# ------------------------------------------------------------------------------------------------
def specs(args):
    from squeezeflow.config import CalibrationSpec, EvalSpec

    calib = CalibrationSpec(n_samples=args.calib_samples, seqlen=args.seqlen, seed=args.seed)
    evaluation = EvalSpec(seqlen=args.seqlen, max_windows=args.eval_windows, kl_windows=args.kl_windows)
    return calib, evaluation


def add_spec_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="smollm2-135m", help="model reference (default smollm2-135m)")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--kl-windows", type=int, default=4)


def spec_argv(args) -> list[str]:
    return ["--model", args.model, "--calib-samples", str(args.calib_samples), "--seqlen", str(args.seqlen),
            "--seed", str(args.seed), "--eval-windows", str(args.eval_windows), "--kl-windows", str(args.kl_windows)]


def peak_rss_mib() -> float | None:
    """This process's own peak RSS (VmHWM of /proc/self/status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def emit(result: dict) -> None:
    """The child's one result line, with its own peak RSS taken last."""
    result = dict(result, peak_rss_mib=peak_rss_mib())
    print("RESULT " + json.dumps(result, sort_keys=True, default=str), flush=True)


# ------------------------------------------------------------------------------------------------
# Child: one of our recipes through the plain pipeline functions (no Prefect)
# ------------------------------------------------------------------------------------------------
def child_ours(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="peers.py _ours")
    add_spec_args(ap)
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--store", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    import torch

    from squeezeflow import pipeline
    from squeezeflow.calibration import CalibrationSet
    from squeezeflow.config import ModelRef
    from squeezeflow.store import open_store

    calib_spec, eval_spec = specs(args)
    marks = {"import": time.perf_counter()}
    plan = pipeline.preflight(ModelRef(ref=args.model), args.recipe, calib_spec, eval_spec)
    marks["preflight"] = time.perf_counter()
    store = open_store(args.store)
    m = plan.model
    calib = pipeline.calibrate(store, m, plan.calibration)
    marks["calibrate"] = time.perf_counter()
    stats = pipeline.saliency(store, m, calib, plan.statistics)
    marks["saliency"] = time.perf_counter()
    _, packed = pipeline.compress_to_packed(store, plan, calib, stats)   # the flow's stages, no Prefect
    store.materialize(packed, args.out)
    marks["compress+pack"] = time.perf_counter()
    seconds, prev = {}, t0
    for k, t in marks.items():
        seconds[k] = round(t - prev, 2)
        prev = t
    seconds["total"] = round(prev - t0, 2)
    provenance = CalibrationSet.get(store, calib).provenance
    emit({"recipe": plan.recipe.name, "method": plan.recipe.methods[0].model_dump(mode="json"),
          "sequential": plan.sequential, "statistics": list(plan.statistics),
          "calibration_windows_sha256": provenance["windows_sha256"], "seconds": seconds,
          "torch_threads": torch.get_num_threads(), "versions": our_versions()})
    return 0


# ------------------------------------------------------------------------------------------------
# Child: evaluate one checkpoint directory with our evaluation (identical for both sides)
# ------------------------------------------------------------------------------------------------
def model_info(ref: str):
    """The ModelInfo preflight builds, without needing a recipe."""
    from squeezeflow.models import load_config, resolve_model
    from squeezeflow.pipeline import ModelInfo

    resolved = resolve_model(ref)
    config = load_config(resolved.path)
    return ModelInfo(ref=ref, name=resolved.name, path=str(resolved.path), fingerprint=resolved.fingerprint,
                     num_layers=config.num_hidden_layers)


def child_eval(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="peers.py _eval")
    add_spec_args(ap)
    ap.add_argument("--path", required=True, help="checkpoint directory (empty = the base model)")
    ap.add_argument("--name", required=True)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    from squeezeflow import pipeline

    _, eval_spec = specs(args)
    info = model_info(args.model)
    path = Path(args.path) if args.path else Path(info.path)
    metrics = pipeline.evaluate_path(path, info, eval_spec, args.name)
    emit({"metrics": metrics, "seconds": round(time.perf_counter() - t0, 2)})
    return 0


# ------------------------------------------------------------------------------------------------
# Orchestrator helpers
# ------------------------------------------------------------------------------------------------
def our_versions() -> dict:
    from squeezeflow.pipeline import git_commit, library_versions

    v = library_versions()
    return {k: v.get(k) for k in ("python", "torch", "transformers", "safetensors", "squeezeflow")} | {
        "squeezeflow_git": git_commit()}


def run_child(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run one subprocess to completion: its wall time, exit code, CPU time (wait4 on exactly this pid) and
    the parsed `RESULT {...}` line; stdout+stderr go to `log`. Peak RSS is the child's own VmHWM, which it
    reports in RESULT: wait4's ru_maxrss is kept as `rusage_maxrss_mib` but is NOT the child's peak, since
    Linux carries the parent's high-water mark over fork/exec into it (here the orchestrator's ~1.5 GiB
    from building the calibration set made every child read about 1.5 GiB)."""
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with open(log, "w") as lf:
        lf.write("$ " + shlex.join(cmd) + "\n")
        lf.flush()
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)   # reaped by wait4: tell Popen
    result = None
    text = log.read_text(errors="replace")
    for line in text.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
    return {"rc": proc.returncode, "wall_s": round(wall, 2), "peak_rss_mib": (result or {}).get("peak_rss_mib"),
            "rusage_maxrss_mib": round(usage.ru_maxrss / 1024, 1),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "loadavg_1m": [round(load_before[0], 2),
                                                                           round(os.getloadavg()[0], 2)],
            "result": result, "log": str(log), "log_tail": "\n".join(text.splitlines()[-25:])}


def peer_env() -> dict:
    """The peer's environment: nothing of our venv leaks in (PYTHONPATH, VIRTUAL_ENV)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def default_peer_venv() -> Path:
    from squeezeflow.settings import cache_home

    return cache_home() / "venvs" / "llmcompressor"


def peer_python_ok(py: Path) -> dict | None:
    """The peer venv's library versions if llmcompressor is installed at the pinned version, else None."""
    if not py.exists():
        return None
    r = subprocess.run([str(py), str(WORKER), "--versions"], capture_output=True, text=True, env=peer_env())
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            v = json.loads(line[len("RESULT "):])
            return v if v.get("llmcompressor") == LLMC_SPEC.split("==")[1] else None
    return None


def ensure_peer_venv(venv: Path) -> tuple[Path, dict]:
    """Create (if missing) llm-compressor's own venv and install the pinned stack; exit 1 with pip's own
    error when that fails."""
    py = venv / "bin" / "python"
    if (versions := peer_python_ok(py)) is not None:
        return py, versions
    steps = []
    if not py.exists():
        steps.append([sys.executable, "-m", "venv", str(venv)])
    # CPU torch first (a bare torch requirement would pull a multi-GB CUDA build), then llm-compressor and
    # whatever it needs at the versions its own pins allow.
    steps.append([str(py), "-m", "pip", "install", TORCH_SPEC])
    steps.append([str(py), "-m", "pip", "install", LLMC_SPEC])
    for cmd in steps:
        print(f"[peer venv] $ {shlex.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env=peer_env())
        if r.returncode != 0:
            out = (r.stdout + r.stderr).strip().splitlines()
            errors = [ln for ln in out if re.search(r"error|conflict|requires|not find|no matching", ln, re.I)]
            print("\n".join(["[peer venv] pip output (last 40 lines):", *out[-40:]]), file=sys.stderr)
            if errors:
                print("[peer venv] error lines:\n" + "\n".join(errors[-15:]), file=sys.stderr)
            raise SystemExit(f"peers.py: could not install llm-compressor's environment in {venv}: "
                             f"`{shlex.join(cmd)}` exited {r.returncode} (pip's error is printed above)")
        print(f"[peer venv]   ok in {time.perf_counter() - t0:.0f} s", flush=True)
    versions = peer_python_ok(py)
    if versions is None:
        raise SystemExit(f"peers.py: {venv} installed, but `{py} {WORKER.name} --versions` does not report "
                         f"{LLMC_SPEC} (import failed?); run it by hand to see why")
    return py, versions


def our_method_available(recipe: str) -> str | None:
    """None if this checkout's get_method builds the recipe's method, else why not."""
    from squeezeflow.recipes import load_recipe
    from squeezeflow.methods import get_method

    try:
        get_method(load_recipe(recipe).methods[0])
    except Exception as e:  # noqa: BLE001 - any failure means: not available in this checkout
        return f"{type(e).__name__}: {e}"
    return None


def verify_peer(src: Path, out: Path, config: str) -> dict:
    """Check the peer checkpoint against the source: every decoder linear changed, nothing else did; GPTQ:
    each group of 64 inputs holds at most 2^bits distinct values; pruning: the fraction of zeros."""
    import torch
    from safetensors import safe_open

    gptq = re.fullmatch(r"gptq-w(\d)g(\d+)(?:-act-mse)?", config)
    report = {"targets": 0, "changed_fraction_min": 1.0, "rel_sq_err_mean": 0.0, "others_unchanged": True,
              "problems": []}
    with safe_open(src / "model.safetensors", "pt") as fs, safe_open(out / "model.safetensors", "pt") as fo:
        if set(fs.keys()) != set(fo.keys()):
            report["problems"].append(f"tensor names differ: {sorted(set(fs.keys()) ^ set(fo.keys()))[:5]}")
            return report
        errs, distinct_max, zero_fracs = [], 0, []
        for key in sorted(fs.keys()):
            a, b = fs.get_tensor(key).float(), fo.get_tensor(key).float()
            if not TARGET_LINEAR.fullmatch(key):
                if not torch.equal(a, b):
                    report["others_unchanged"] = False
                    report["problems"].append(f"{key} (not a target) changed")
                continue
            report["targets"] += 1
            changed = float((a != b).float().mean())
            report["changed_fraction_min"] = min(report["changed_fraction_min"], changed)
            errs.append(float(((a - b) ** 2).sum() / (a ** 2).sum()))
            if changed == 0:
                report["problems"].append(f"{key} unchanged")
            if gptq:
                g = int(gptq.group(2))
                groups = b.reshape(b.shape[0], b.shape[1] // g, g).sort(-1).values
                n_distinct = (groups[..., 1:] != groups[..., :-1]).sum(-1) + 1
                distinct_max = max(distinct_max, int(n_distinct.max()))
            else:
                zero_fracs.append(float((b == 0).float().mean()))
        report["rel_sq_err_mean"] = sum(errs) / max(len(errs), 1)
        if gptq:
            bits = int(gptq.group(1))
            report["group_distinct_max"] = distinct_max
            if distinct_max > 2 ** bits:
                report["problems"].append(f"a group holds {distinct_max} distinct values > 2^{bits}")
        else:
            report["zero_fraction_min"], report["zero_fraction_max"] = min(zero_fracs), max(zero_fracs)
            if min(zero_fracs) < 0.49:
                report["problems"].append(f"a matrix is only {min(zero_fracs):.3f} zeros")
    if report["targets"] == 0:
        report["problems"].append("no decoder linear found")
    report["ok"] = not report["problems"]
    return report


def fmt(x, nd=3):
    return "—" if x is None else f"{x:.{nd}f}"


def short_versions(v: dict, side: str) -> str:
    names = {"torch": "torch", "transformers": "transformers", "llmcompressor": "llmcompressor",
             "compressed-tensors": "compressed-tensors", "squeezeflow": "squeezeflow"}
    parts = [f"{label} {v[k]}" for k, label in names.items() if v.get(k)]
    if side == "squeezeflow" and v.get("squeezeflow_git"):
        parts[-1] += f" ({v['squeezeflow_git'][:8]})"
    return ", ".join(parts)


def render_table(runs: list[dict], splits: list[str]) -> str:
    head = ["side", "config", *[f"ppl {s}" for s in splits], *[f"KL {s}" for s in splits], "wall s",
            "peak RSS MiB", "eval s", "versions"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        m = r.get("metrics") or {}
        ppl = [fmt((m.get("perplexity") or {}).get(s)) for s in splits]
        kl = [fmt(((m.get("kl") or {}).get(s) or {}).get("kl"), 4) for s in splits]
        c = r.get("compress") or {}
        cells = [r["side"], r["config"] + ("" if r.get("ok", True) else " (FAILED)"), *ppl, *kl,
                 fmt(c.get("wall_s"), 1), fmt(c.get("peak_rss_mib"), 0), fmt((r.get("eval") or {}).get("wall_s"), 1),
                 short_versions(r.get("versions") or {}, r["side"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_stages(runs: list[dict]) -> str:
    lines = ["| side | config | stage seconds (inside the compression process) | CPU s | load avg 1m (start, end) |",
             "|---|---|---|---|---|"]
    for r in runs:
        c = r.get("compress") or {}
        secs = ((c.get("result") or {}).get("seconds")) or {}
        order = ["import", "load", "preflight", "calibrate", "saliency", "oneshot", "compress", "pack", "save"]
        keys = sorted((k for k in secs if k != "total"), key=lambda k: (order.index(k) if k in order else 99, k))
        stages = ", ".join(f"{k} {secs[k]:.1f}" for k in keys)
        lines.append(f"| {r['side']} | {r['config']} | {stages or '—'} | {fmt(c.get('cpu_s'), 0)} | "
                     f"{', '.join(str(x) for x in c.get('loadavg_1m', [])) or '—'} |")
    return "\n".join(lines)


def ratios(runs: list[dict], splits: list[str]) -> list[dict]:
    by = {(r["side"], r["config"]): r for r in runs if r.get("ok", True) and r.get("metrics")}
    out = []
    for cfg in GPTQ_CONFIGS:
        ours, theirs = by.get(("squeezeflow", cfg)), by.get(("llm-compressor", cfg))
        if not (ours and theirs):
            continue
        row = {"config": cfg, "ratio": {}}
        for s in splits:
            row["ratio"][s] = round(ours["metrics"]["perplexity"][s] / theirs["metrics"]["perplexity"][s], 4)
        row["within_2pct"] = all(v <= TARGET_RATIO for v in row["ratio"].values())
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------------
# Orchestrator
# ------------------------------------------------------------------------------------------------
def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_spec_args(ap)
    ap.add_argument("--recipes", default=",".join(OUR_RECIPES),
                    help=f"our recipes, comma-separated ('' = none; default {','.join(OUR_RECIPES)})")
    ap.add_argument("--peers", default=",".join(PEER_CONFIGS),
                    help=f"llm-compressor configs, comma-separated ('' = none; from {','.join(PEER_CONFIGS)})")
    ap.add_argument("--no-baseline", action="store_true", help="skip the fp32 reference evaluation")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--md", type=Path, help="write the table (and the command) here as markdown")
    ap.add_argument("--peer-venv", type=Path, help="llm-compressor venv (default $SQUEEZEFLOW_CACHE/venvs/llmcompressor)")
    ap.add_argument("--workdir", type=Path, help="scratch directory (default: a new temporary one, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints and logs in the workdir")
    args = ap.parse_args(argv)
    recipes = [r for r in args.recipes.split(",") if r]
    peers = [p for p in args.peers.split(",") if p]
    if bad := [p for p in peers if p not in PEER_CONFIGS]:
        ap.error(f"unknown peer config(s) {bad}: choose from {', '.join(PEER_CONFIGS)}")
    exe = Path(sys.executable)
    exe = exe.relative_to(ROOT) if exe.is_relative_to(ROOT) else Path(exe.name)
    command = shlex.join([str(exe), "benchmarks/peers.py", *argv])

    import torch
    from safetensors.torch import save_file

    from squeezeflow import pipeline
    from squeezeflow.calibration import CalibrationSet
    from squeezeflow.config import ModelRef
    from squeezeflow.recipes import load_recipe
    from squeezeflow.store import open_store

    for r in recipes:
        load_recipe(r)   # a bad name fails now, before any heavy work
    notes: list[str] = []
    available = []
    for r in recipes:
        why = our_method_available(r)
        if why:
            note = f"squeezeflow {r}: skipped, this checkout's get_method does not accept it ({why})"
            print(note, flush=True)
            notes.append(note)
        else:
            available.append(r)
    recipes = available

    peer_py, peer_versions = None, {}
    if peers:
        peer_py, peer_versions = ensure_peer_venv(args.peer_venv or default_peer_venv())
        print(f"llm-compressor venv: {peer_py} ({short_versions(peer_versions, 'llm-compressor')})", flush=True)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="squeezeflow-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    calib_spec, eval_spec = specs(args)
    ours_env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    try:
        # Our calibration set, built as the pipeline builds it, in a throwaway store.
        store = open_store(str(work / "calib-store"))
        plan = pipeline.preflight(ModelRef(ref=args.model), "gptq-w4g64", calib_spec, eval_spec)
        calib_ref = pipeline.calibrate(store, plan.model, plan.calibration)
        cset = CalibrationSet.get(store, calib_ref)
        calib_file = work / "calib.safetensors"
        save_file({"input_ids": cset.windows.to(torch.int64).contiguous()}, str(calib_file),
                  metadata={"windows_sha256": cset.provenance["windows_sha256"]})
        model_path = Path(plan.model.path)
        print(f"model {plan.model.name} ({plan.model.fingerprint[:12]}) at {model_path}; calibration "
              f"{tuple(cset.windows.shape)} windows_sha256 {cset.provenance['windows_sha256'][:12]}", flush=True)

        runs: list[dict] = []

        def evaluate(run: dict, path: Path | None) -> None:
            name = f"{run['side']}:{run['config']}"
            e = run_child([sys.executable, __file__, "_eval", *spec_argv(args), "--path", str(path or ""),
                           "--name", name], work / "logs" / f"eval-{run['side']}-{run['config']}.log", ours_env)
            run["eval"] = {k: v for k, v in e.items() if k not in ("result", "log_tail")}
            if e["rc"] != 0 or not e["result"]:
                run["ok"] = False
                run["problems"].append(f"evaluation exited {e['rc']}: {e['log_tail'][-800:]}")
                return
            run["eval"]["seconds"] = e["result"]["seconds"]
            run["metrics"] = e["result"]["metrics"]

        def announce(run: dict) -> None:
            m = run.get("metrics") or {}
            ppl = ", ".join(f"{s} {v:.3f}" for s, v in (m.get("perplexity") or {}).items())
            c = run.get("compress") or {}
            print(f"  -> {run['side']} {run['config']}: ok={run['ok']} ppl [{ppl}] wall {c.get('wall_s')} s, "
                  f"peak RSS {c.get('peak_rss_mib')} MiB" + (f"; problems: {run['problems']}" if run["problems"] else ""),
                  flush=True)

        if not args.no_baseline:
            print("[fp32] evaluating the base model", flush=True)
            run = {"side": "reference", "config": "fp32", "ok": True, "problems": [], "versions": our_versions()}
            evaluate(run, None)
            runs.append(run)
            announce(run)

        # Pairs first (ours, then the matching peer), then whatever is left, so machine load hits both alike.
        order: list[tuple[str, str]] = []
        for r in recipes:
            order.append(("squeezeflow", r))
            if PAIRS.get(r) in peers:
                order.append(("llm-compressor", PAIRS[r]))
        order += [("llm-compressor", p) for p in peers if ("llm-compressor", p) not in order]

        for side, cfg in order:
            print(f"[{side}] {cfg}: compressing", flush=True)
            run = {"side": side, "config": cfg, "ok": True, "problems": []}
            out = work / f"{side}-{cfg}"
            shutil.rmtree(out, ignore_errors=True)
            if side == "squeezeflow":
                st = work / f"store-{cfg}"
                shutil.rmtree(st, ignore_errors=True)
                cmd = [sys.executable, __file__, "_ours", *spec_argv(args), "--recipe", cfg, "--store", str(st),
                       "--out", str(out)]
                c = run_child(cmd, work / "logs" / f"compress-{side}-{cfg}.log", ours_env)
                shutil.rmtree(st, ignore_errors=True)
            else:
                cmd = [str(peer_py), str(WORKER), "--config", cfg, "--model", str(model_path), "--calib",
                       str(calib_file), "--out", str(out)]
                c = run_child(cmd, work / "logs" / f"compress-{side}-{cfg}.log", peer_env())
            run["compress"] = {k: v for k, v in c.items() if k != "log_tail"}
            res = c["result"] or {}
            run["versions"] = res.get("versions") or (our_versions() if side == "squeezeflow" else peer_versions)
            if c["rc"] != 0 or not c["result"]:
                run["ok"] = False
                run["problems"].append(f"compression exited {c['rc']}: {c['log_tail'][-1500:]}")
                print(f"  !! {side} {cfg} failed (log {c['log']}):\n{c['log_tail']}", flush=True)
                runs.append(run)
                continue
            if side == "squeezeflow" and res.get("calibration_windows_sha256") != cset.provenance["windows_sha256"]:
                run["problems"].append("its calibration windows differ from the ones given to llm-compressor")
                run["ok"] = False
            if side == "llm-compressor":
                run["checks"] = verify_peer(model_path, out, cfg)
                if not run["checks"]["ok"]:
                    run["ok"] = False
                    run["problems"] += run["checks"]["problems"]
            evaluate(run, out)
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
            runs.append(run)
            announce(run)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    splits = list(eval_spec.splits)
    table = render_table(runs, splits)
    stages = render_stages(runs)
    rat = ratios(runs, splits)
    verdict_lines = []
    for r in rat:
        parts = ", ".join(f"{s} {v:.4f}" for s, v in r["ratio"].items())
        verdict_lines.append(f"ours / llm-compressor perplexity, {r['config']}: {parts} -> "
                             f"{'within' if r['within_2pct'] else 'NOT within'} 2%")
    print()
    print(table)
    print()
    print(stages)
    print()
    print("\n".join(verdict_lines) or "no GPTQ pair ran: no ratio")
    for n in notes:
        print("note: " + n)
    failed = [f"{r['side']} {r['config']}: {'; '.join(r['problems'])}" for r in runs if not r.get("ok", True)]
    for f in failed:
        print("FAILED " + f[:2000])

    result = {
        "command": command,
        "model": {"ref": args.model, "name": plan.model.name, "fingerprint": plan.model.fingerprint},
        "calibration": {**calib_spec.model_dump(mode="json"), "windows_sha256": cset.provenance["windows_sha256"],
                        "text_sha256": cset.provenance.get("text_sha256")},
        "evaluation": eval_spec.model_dump(mode="json"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch_threads": torch.get_num_threads()},
        "versions": {"squeezeflow": our_versions(), "llm-compressor": peer_versions},
        "runs": runs,
        "gptq_ratio": rat,
        "target": f"ours within {round((TARGET_RATIO - 1) * 100)}% of llm-compressor's perplexity (GPTQ W4 and W3)",
        "notes": notes,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, sort_keys=True, default=str) + "\n")
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        md = [f"# Peer baseline: Squeezeflow vs llm-compressor ({plan.model.name})", "",
              "Command:", "", "```", command, "```", "",
              f"Calibration: {args.calib_samples} windows × {args.seqlen} tokens of {calib_spec.source} (seed "
              f"{args.seed}), identical token ids on both sides (windows sha256 "
              f"`{cset.provenance['windows_sha256'][:16]}`). Evaluation: our `evaluate_path` for every row: "
              f"perplexity on {args.eval_windows} windows of {args.seqlen} tokens of each held-out split, KL vs "
              f"the fp32 model on {args.kl_windows} windows. `wall s` / `peak RSS` belong to the compression "
              f"subprocess alone (imports, load, statistics, compression, writing the checkpoint); `eval s` is "
              f"the evaluation subprocess. Machine: {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}.",
              "", table, "", stages, "", *[f"- {v}" for v in verdict_lines], *[f"- note: {n}" for n in notes],
              *[f"- FAILED {f[:500]}" for f in failed], ""]
        args.md.write_text("\n".join(md))
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_ours":
        sys.exit(child_ours(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "_eval":
        sys.exit(child_eval(sys.argv[2:]))
    sys.exit(main(sys.argv[1:]))
