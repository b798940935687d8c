#!/usr/bin/env python
"""Per-format linear-layer microbenchmarks and end-to-end decode speed, against dense in the same run.

    .venv/bin/python benchmarks/kernel_speed.py [--device auto|cpu|cuda] [--shapes real,4096x4096]
        [--batches 1,16,64] [--formats dense,intq-w4g64,...] [--no-e2e] [--threads N] [--json PATH]

Each packed format is a random layer of that format (speed does not depend on the values) called
through its module's forward, so the dispatch a user gets is what is timed: on CUDA the Triton kernels
(kernels/triton_*.py) and torch's 2:4 sparse GEMM, on CPU the torch reference (dequantize, then
``F.linear``). The baseline is ``F.linear`` with the dense weight in the compute dtype: float32 on CPU,
float16 on GPU. ``speedup`` = dense time / format time (> 1: the format is faster).

Shapes are (out x in): "real" = SmolLM2-135M's 576x576 (q/o), 192x576 (k/v), 1536x576 (gate/up),
576x1536 (down); "large" = 4096x4096, 14336x4096, 4096x14336 (Llama-3-8B's MLP). Batch 1 is the GEMV
(decode) path, 16-64 the GEMM path.

End to end: greedy decode tokens/s of SmolLM2-135M with every decoder linear RTN-packed (intq W4 g64),
against the base model, interleaved (squeezeflow.evaluation.speed.speed_ratios).

CPU timings on a shared machine are noisy: every number is a median, and only ratios taken within one
run are meaningful. Results go to benchmarks/results/kernels_<device>.json.
"""
from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's directory comes first on sys.path, and its name would shadow the
# `kernels` package transformers probes for. squeezeflow itself is installed into the venv.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from squeezeflow.kernels.outlier_linear import OutlierQuantLinear  # noqa: E402
from squeezeflow.kernels.quant_linear import QuantLinear  # noqa: E402
from squeezeflow.kernels.sparse_linear import NMLinear  # noqa: E402
from squeezeflow.kernels.vq_linear import VQLinear  # noqa: E402

SHAPES = {"real": [(576, 576), (192, 576), (1536, 576), (576, 1536)],
          "large": [(4096, 4096), (14336, 4096), (4096, 14336)]}
FORMATS = ("dense", "intq-w4g64", "intq-w4g64-cached", "intq-w3g64", "intq_outliers-w3g64-o1", "vq-2bit-d6",
           "nm-2:4")


# ---- random layers of each format ---------------------------------------------------------------
def make_layer(fmt: str, out_f: int, in_f: int, g: torch.Generator) -> torch.nn.Module:
    if fmt == "dense":
        layer = torch.nn.Linear(in_f, out_f, bias=False)
        torch.nn.init.normal_(layer.weight, std=0.02, generator=g)
        return layer
    if fmt.startswith("intq"):
        bits, gs = (4, 64) if "w4" in fmt else (3, 64)
        codes = torch.randint(0, 2**bits, (out_f, in_f), generator=g)
        scales = torch.rand(out_f, in_f // gs, generator=g) * 0.01 + 1e-3
        zeros = torch.randint(0, 2**bits, (out_f, in_f // gs), generator=g).float()
        if fmt.startswith("intq_outliers"):
            keep = torch.rand(out_f, in_f, generator=g) < 0.01
            codes[keep] = zeros.long().repeat_interleave(gs, dim=1)[keep]
            nnz = int(keep.sum())
            layer = OutlierQuantLinear(in_f, out_f, bits, gs, nnz)
            fields = OutlierQuantLinear.pack_fields(codes, scales, zeros, keep, torch.randn(nnz, generator=g) * 0.1,
                                                    bits, gs, nnz)
            layer.load_state_dict(fields)
            return layer
        layer = QuantLinear.from_codes(codes, scales, zeros, bits, gs)
        layer.cache_dequantized = fmt.endswith("cached")
        return layer
    if fmt.startswith("vq"):
        bits, d = 2, 6
        k = 2 ** (bits * d)
        codes = torch.randint(0, k, (out_f, -(-in_f // d)), generator=g)
        return VQLinear.from_codes(codes, torch.randn(k, d, generator=g) * 0.02, torch.rand(out_f, generator=g) + 0.5,
                                   torch.rand(in_f, generator=g) + 0.5, bits, d, k)
    if fmt == "nm-2:4":
        scores = torch.rand(out_f, in_f // 4, 4, generator=g)
        mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(2, dim=-1).indices, True)
        layer = NMLinear(in_f, out_f, 2, 4)
        layer.load_state_dict(NMLinear.pack_fields(mask.view(out_f, in_f), torch.randn(out_f, in_f, generator=g) * 0.02,
                                                   2, 4))
        return layer
    raise SystemExit(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")


# ---- timing -------------------------------------------------------------------------------------
def time_ms(fn, device: torch.device, budget_s: float, min_reps: int = 3) -> float:
    """Median milliseconds of ``fn()``; CUDA via triton's do_bench (warm-up, cache flush), CPU by hand."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()  # warm-up (first-call allocations, the dequant cache when opted in)
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


# no_grad, not inference_mode: layers built under inference_mode hold inference tensors, which have no
# version counter for the dequant cache to key on.
@torch.no_grad()
def micro(device: torch.device, dtype: torch.dtype, shapes, batches, formats, budget_s: float) -> list[dict]:
    rows = []
    for out_f, in_f in shapes:
        g = torch.Generator().manual_seed(out_f * 100003 + in_f)
        layers = {fmt: make_layer(fmt, out_f, in_f, g).to(device=device, dtype=dtype) for fmt in formats}
        for batch in batches:
            x = torch.randn(batch, in_f, generator=g).to(device=device, dtype=dtype)
            dense_ms = time_ms(lambda: layers["dense"](x), device, budget_s)
            for fmt in formats:
                ms = dense_ms if fmt == "dense" else time_ms(lambda: layers[fmt](x), device, budget_s)
                rows.append({"format": fmt, "out": out_f, "in": in_f, "batch": batch, "ms": ms, "dense_ms": dense_ms,
                             "speedup": dense_ms / ms})
                print(f"{fmt:24s} {out_f:6d}x{in_f:<6d} b={batch:<3d} {ms:9.3f} ms  dense {dense_ms:9.3f} ms  "
                      f"speedup {dense_ms / ms:6.2f}", flush=True)
            del x
        del layers
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ---- end to end ---------------------------------------------------------------------------------
def rtn_pack(model: torch.nn.Module, bits: int = 4, group_size: int = 64, cached: bool = False) -> torch.nn.Module:
    """Every decoder-block linear replaced by its RTN (min-max, asymmetric) intq module, in place."""
    from squeezeflow.methods.intq.rtn import quantize_groupwise
    from squeezeflow.models import decoder_linears

    for layer in model.model.layers:
        for name, linear in decoder_linears(layer).items():
            codes, scales, zeros = quantize_groupwise(linear.weight.data.float(), bits, group_size)
            q = QuantLinear.from_codes(codes, scales, zeros, bits, group_size,
                                       bias=None if linear.bias is None else linear.bias.data.float())
            q.cache_dequantized = cached
            parent_name, _, child = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            setattr(parent, child, q)
    return model


def end_to_end(device: torch.device, dtype: torch.dtype, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    from squeezeflow.evaluation.speed import speed_ratios
    from squeezeflow.models import load_model, prepare_model

    path = prepare_model("smollm2-135m").path
    base = load_model(path).to(device=device, dtype=dtype)
    out = {}
    variants = [("intq-w4g64", False), ("intq-w4g64-cached", True)]
    for label, cached in variants:
        packed = rtn_pack(load_model(path), cached=cached).to(device=device, dtype=dtype)
        r = speed_ratios(packed, base, prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats, warmup=1)
        out[label] = r
        print(f"e2e {label:20s} decode {r['model']['decode_tokens_per_s']:8.2f} tok/s  base "
              f"{r['base']['decode_tokens_per_s']:8.2f} tok/s  ratio {r['decode_ratio']:.3f}  "
              f"(prefill ratio {r['prefill_ratio']:.3f})", flush=True)
        del packed
    return out


def markdown(result: dict) -> str:
    """The microbenchmark as one table (a row per shape and batch: dense ms, then each format's speedup)
    and the end-to-end ratios."""
    rows, info = result["micro"], result["settings"]
    formats = [f for f in dict.fromkeys(r["format"] for r in rows) if f != "dense"]
    lines = [f"Device: {info['device']} ({info['dtype']}), torch {info['torch']}, triton {info['triton']}, "
             f"{info['threads']} thread(s), load average {info['load_average']}. Command: `{info['command']}`.",
             "", "Speedup = dense ms / format ms in the same run (> 1: faster than dense).", "",
             "| out x in | batch | dense ms | " + " | ".join(formats) + " |",
             "|---|---|---|" + "---|" * len(formats)]
    for (out_f, in_f, batch) in dict.fromkeys((r["out"], r["in"], r["batch"]) for r in rows):
        cell = {r["format"]: r for r in rows if (r["out"], r["in"], r["batch"]) == (out_f, in_f, batch)}
        dense = next(iter(cell.values()))["dense_ms"]
        lines.append(f"| {out_f}x{in_f} | {batch} | {dense:.3f} | "
                     + " | ".join(f"{cell[f]['speedup']:.2f}" if f in cell else "" for f in formats) + " |")
    if result.get("end_to_end"):
        lines += ["", "End to end, SmolLM2-135M, every decoder linear RTN-packed (decode tokens/s, greedy, KV cache):",
                  "", "| variant | decode tok/s | base tok/s | decode ratio | prefill ratio |", "|---|---|---|---|---|"]
        for label, r in result["end_to_end"].items():
            lines.append(f"| {label} | {r['model']['decode_tokens_per_s']:.2f} | {r['base']['decode_tokens_per_s']:.2f} "
                         f"| {r['decode_ratio']:.3f} | {r['prefill_ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def parse_shapes(spec: str) -> list[tuple[int, int]]:
    shapes = []
    for part in spec.split(","):
        if part in SHAPES:
            shapes += SHAPES[part]
        else:
            out_f, _, in_f = part.partition("x")
            shapes.append((int(out_f), int(in_f)))
    return shapes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--shapes", default=None, help="'real', 'large' and/or OUTxIN, comma-separated "
                    "(default: real,large on CUDA; real,4096x4096 on CPU)")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--budget", type=float, default=0.5, help="CPU seconds per measurement (median of the reps)")
    ap.add_argument("--no-e2e", action="store_true")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="default benchmarks/results/kernels_<cpu|cuda>.json")
    ap.add_argument("--render", default=None, metavar="JSON", help="only rewrite JSON's markdown table, no timing")
    args = ap.parse_args()
    if args.render:
        src = Path(args.render)
        src.with_suffix(".md").write_text(markdown(json.loads(src.read_text())))
        print(f"wrote {src.with_suffix('.md')}")
        return

    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    shapes = parse_shapes(args.shapes or ("real,large" if device.type == "cuda" else "real,4096x4096"))
    formats = [f for f in args.formats.split(",") if f]
    if "dense" not in formats:
        formats.insert(0, "dense")
    batches = [int(b) for b in args.batches.split(",")]

    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "kernels": os.environ.get("SQUEEZEFLOW_KERNELS", "auto"),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "command": " ".join([Path(sys.executable).name, *sys.argv])}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    print(json.dumps(info), flush=True)
    t0 = time.time()
    rows = micro(device, dtype, shapes, batches, formats, args.budget)
    e2e = None if args.no_e2e else end_to_end(device, dtype, args.prompt_len, args.new_tokens, args.repeats)
    info["wall_s"] = round(time.time() - t0, 1)
    dest = Path(args.json) if args.json else _HERE / "results" / f"kernels_{device.type}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    result = {"settings": info, "micro": rows, "end_to_end": e2e}
    dest.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    dest.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {dest} and {dest.with_suffix('.md')}")


if __name__ == "__main__":
    main()
