#!/usr/bin/env python
"""Everything the GPU path claims, measured in one command that fits in ~8 minutes on one H100.

    python -P benchmarks/gpu_proof.py --out $OUT            # on the device machine
    python -P benchmarks/gpu_proof.py --quick --device cpu  # what tests/unit/test_gpu_proof.py runs

Sections (each timed, each skipped with a note when the budget runs out, results in gpu_proof.json):
1. xtx: XᵀX throughput per accumulation dtype (fp64, fp32, bf16/tf32), and each one's error against fp64
   (the statistics dtype question: fp64 XᵀX measurably helps GPTQ W3 on CPU; is it affordable on a GPU?).
2. gptq: GPTQ (W4 g128, act-order) on every linear of one Llama-3-8B-shaped and one 70B-shaped block on the
   device: seconds per block, peak device memory; parity with the CPU result on the 8B q_proj (same codes?).
3. pipeline: the trunk on the device (ComputeSpec(device=...)) for rtn and gptq on a tiny random Llama:
   statistics, compress, pack and streamed evaluation run there; perplexity against the CPU run's.
4. kernels: benchmarks/kernel_speed.py on Llama-3-8B shapes at batch 1...2048 (Triton against fp16
   F.linear), plus the first call's time (Triton autotune) against a warm call.
5. decode: greedy decode tokens/s of a full-depth random Llama-3-8B in bf16, with every linear RTN W4 g64
   through the Triton kernels, and with the dequantized-weight cache.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # see kernel_speed.py

import torch  # noqa: E402

LLAMA = {"8b": dict(hidden=4096, inter=14336, heads=32, kv=8, layers=32, vocab=128256),
         "70b": dict(hidden=8192, inter=28672, heads=64, kv=8, layers=80, vocab=128256),
         "tiny": dict(hidden=256, inter=512, heads=4, kv=2, layers=2, vocab=49152)}


def block_linears(s: dict) -> dict[str, tuple[int, int]]:
    hd = s["hidden"] // s["heads"]
    return {"q_proj": (s["heads"] * hd, s["hidden"]), "k_proj": (s["kv"] * hd, s["hidden"]),
            "v_proj": (s["kv"] * hd, s["hidden"]), "o_proj": (s["hidden"], s["heads"] * hd),
            "gate_proj": (s["inter"], s["hidden"]), "up_proj": (s["inter"], s["hidden"]),
            "down_proj": (s["hidden"], s["inter"])}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def xtx(device: torch.device, quick: bool) -> list[dict]:
    tokens, d = (512, 256) if quick else (16384, 4096)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, d, generator=g, device=device)
    ref = x.double().T @ x.double()
    rows = []
    for name, cast in (("fp64", torch.float64), ("fp32", torch.float32), ("bf16", torch.bfloat16),
                       ("fp16", torch.float16)):
        xc = x.to(cast) if cast != torch.float16 else (x / 4).to(cast)  # fp16: stay inside its range
        scale = 1.0 if cast != torch.float16 else 16.0
        (xc.T @ xc)
        sync(device)
        reps, t = 0, time.perf_counter()
        while reps < 3 or time.perf_counter() - t < (0.2 if quick else 1.0):
            h = (xc.T @ xc)
            reps += 1
        sync(device)
        sec = (time.perf_counter() - t) / reps
        err = float(((h.double() * scale - ref).norm() / ref.norm()))
        rows.append({"dtype": name, "tflops": 2 * tokens * d * d / sec / 1e12, "rel_error_vs_fp64": err})
    return rows


def gptq(device: torch.device, quick: bool, budget_end: float) -> dict:
    from squeezeflow.methods.intq.gptq_core import gptq_quantize

    out = {}
    for shape in (("tiny",) if quick else ("8b", "70b")):
        lin = block_linears(LLAMA[shape])
        g = torch.Generator(device=device).manual_seed(1)
        tokens = 512 if quick else 4096
        xs = {d: torch.randn(tokens, d, generator=g, device=device) for d in {i for _, i in lin.values()}}
        hs = {d: (x.T @ x).double() for d, x in xs.items()}
        peak_reset(device)
        sync(device)
        t0, per = time.perf_counter(), {}
        for name, (o, i) in lin.items():
            if time.perf_counter() > budget_end:
                out[shape] = {"skipped": "budget"}
                break
            w = torch.randn(o, i, generator=g, device=device) * i ** -0.5
            t = time.perf_counter()
            res = gptq_quantize(w, hs[i].float() if device.type == "cuda" else hs[i], 4, 128, act_order=True)
            sync(device)
            per[name] = round(time.perf_counter() - t, 3)
            if name == "q_proj" and shape in ("8b", "tiny"):
                cpu = gptq_quantize(w.cpu(), hs[i].cpu(), 4, 128, act_order=True)
                same = float((cpu.codes == res.codes.cpu()).float().mean())
                out[f"{shape}_q_proj_parity"] = {"codes_equal_fraction": same,
                                                 "max_abs_weight_diff": float((cpu.w_hat - res.w_hat.cpu()).abs().max())}
            del w, res
        else:
            out[shape] = {"seconds_per_block": round(time.perf_counter() - t0, 2), "per_linear_s": per,
                          "peak_device_bytes": peak(device), "tokens": tokens}
        del xs, hs
    return out


def pipeline_on_device(device: torch.device) -> dict:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from squeezeflow import pipeline
    from squeezeflow.config import CalibrationSpec, ComputeSpec, EvalSpec, ModelRef
    from squeezeflow.store import LocalStore

    root = Path(tempfile.mkdtemp(prefix="gpu-proof-"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=256,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=512, tie_word_embeddings=True))
    model.save_pretrained(root / "tiny")
    try:
        from squeezeflow.models import prepare_model

        AutoTokenizer.from_pretrained(prepare_model("smollm2-135m").path).save_pretrained(root / "tiny")
    except Exception as e:  # noqa: BLE001  (the device machine may lack the prepared model: say so)
        return {"skipped": f"no tokenizer: {e}"}
    out = {}
    for recipe in ("rtn-w4g64", "gptq-w4g64"):
        ppl = {}
        for dev in ("cpu", str(device)):
            job = pipeline.preflight(ModelRef(ref=str(root / "tiny")), recipe, CalibrationSpec(n_samples=8, seqlen=128),
                                     EvalSpec(seqlen=128, max_windows=4, kl_windows=2), ComputeSpec(device=dev))
            store = LocalStore(root / f"store-{dev.replace(':', '_')}")
            t = time.perf_counter()
            res = pipeline.run_job(job, store)
            m = store.get_json(res["metrics"])
            ppl[dev] = {"perplexity": m["perplexity"], "kl": m["kl"], "seconds": round(time.perf_counter() - t, 1)}
        out[recipe] = ppl
    return out


def kernels(device: torch.device, quick: bool, out_dir: Path) -> dict:
    if device.type != "cuda" and not quick:
        return {"skipped": "no CUDA device"}
    cmd = [sys.executable, "-P", str(HERE / "kernel_speed.py"), "--device", str(device.type),
           "--shapes", "256x256" if quick else "large", "--batches", "1,16" if quick else "1,16,64,256,1024,2048",
           "--formats", "dense,intq-w4g64" if quick else "dense,intq-w4g64,intq-w4g64-cached,intq-w3g64,vq-2bit-d6,nm-2:4",
           "--no-e2e", "--json", str(out_dir / "kernels.json")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    result = {"returncode": p.returncode, "tail": p.stdout[-3000:] + p.stderr[-1000:]}
    if p.returncode == 0:
        result["table"] = json.loads((out_dir / "kernels.json").read_text())
    if device.type == "cuda":  # the first call of a fresh shape pays Triton's autotune
        ks = _kernel_speed()
        layer = ks.make_layer("intq-w4g64", 14336, 4096, torch.Generator().manual_seed(3)).to(device, torch.float16)
        x = torch.randn(7, 4096, device=device, dtype=torch.float16)
        sync(device)
        t = time.perf_counter()
        layer(x)
        sync(device)
        first = time.perf_counter() - t
        t = time.perf_counter()
        layer(x)
        sync(device)
        result["first_call_s"], result["warm_call_s"] = first, time.perf_counter() - t
    return result


def decode(device: torch.device, quick: bool) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from squeezeflow.evaluation.speed import speed_ratios

    s = LLAMA["tiny" if quick else "8b"]
    cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
                      max_position_embeddings=4096)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        base = LlamaForCausalLM(cfg).to(dtype).eval()
    ks = _kernel_speed()
    out = {"params": sum(p.numel() for p in base.parameters())}
    for label, cached in (("w4g64-triton", False), ("w4g64-dequant-cache", True)):
        with torch.device(device):
            packed = LlamaForCausalLM(cfg).to(dtype).eval()
        packed.load_state_dict(base.state_dict())
        ks.rtn_pack(packed, cached=cached).to(device=device, dtype=torch.float16 if device.type == "cuda" else dtype)
        r = speed_ratios(packed, base, prompt_len=32 if quick else 128, new_tokens=8 if quick else 64,
                         repeats=1 if quick else 3, warmup=1)
        out[label] = {"decode_tok_s": r["model"]["decode_tokens_per_s"], "base_bf16_tok_s": r["base"]["decode_tokens_per_s"],
                      "decode_ratio": r["decode_ratio"], "prefill_ratio": r["prefill_ratio"]}
        del packed
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def _kernel_speed():
    spec = importlib.util.spec_from_file_location("kernel_speed", HERE / "kernel_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (a CPU check that the script runs)")
    ap.add_argument("--budget-s", type=float, default=420.0)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")))
    ap.add_argument("--only", help="comma-separated sections")
    args = ap.parse_args()
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    end = start + args.budget_s
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "quick": args.quick, "sections": {}}
    sections = {"xtx": lambda: xtx(device, args.quick), "gptq": lambda: gptq(device, args.quick, end),
                "pipeline": lambda: pipeline_on_device(device), "kernels": lambda: kernels(device, args.quick, args.out),
                "decode": lambda: decode(device, args.quick)}
    wanted = args.only.split(",") if args.only else list(sections)
    for name in wanted:
        if time.perf_counter() > end:
            result["sections"][name] = {"skipped": "budget"}
            continue
        t = time.perf_counter()
        try:
            value = sections[name]()
        except Exception as e:  # noqa: BLE001  (one broken section must not lose the others' numbers)
            value = {"error": f"{type(e).__name__}: {e}"}
        result["sections"][name] = {"seconds": round(time.perf_counter() - t, 1), "result": value}
        print(f"== {name} ({time.perf_counter() - t:.1f} s)\n{json.dumps(value, indent=1, default=str)[:4000]}",
              flush=True)
        (args.out / "gpu_proof.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    errors = [n for n, s in result["sections"].items() if isinstance(s.get("result"), dict) and "error" in s["result"]]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
