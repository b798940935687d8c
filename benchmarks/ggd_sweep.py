"""Generalized-Gaussian coding on the real model: RF8 vs FP8 e4m3, exp-Golomb storage, BackSlash λ sweep.

Each recipe goes through the pipeline's stages as plain calls (cached in the artifact store), then the
packed checkpoint is loaded back through from_pretrained and evaluated: perplexity on both held-out
splits, bits per weight of the decoder linears and bytes of model.safetensors from disk. For exp-Golomb
("eg") artifacts it also reports, over the decoder linears: the stream bytes (with rank tables and sync
offsets), the fixed-length bit-packed codes the same layers would take, zstd (level 19) of those
fixed-length codes, the time to decode every stream, and the whole file against a bf16 copy of the model.
Results are merged by recipe into the JSON file, so the sweep can be run in pieces:

    .venv/bin/python benchmarks/ggd_sweep.py --recipes rf8,fp8-e4m3
    .venv/bin/python benchmarks/ggd_sweep.py --recipes rtn-w8gc-eg,rtn-w6gc-eg,rtn-w4g64-eg,rf8-eg
    .venv/bin/python benchmarks/ggd_sweep.py --recipes backslash-l0-w8gc,backslash-l1e3-w8gc-s20,...
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path


RESULTS = Path(__file__).parent / "results" / "ggd_sweep.json"


def eg_sizes(path: Path) -> dict:
    """Storage of the decoder linears' codes of an "eg" checkpoint: exp-Golomb vs fixed length vs zstd."""
    import numpy as np
    import torch

    from squeezeflow.kernels.eg_linear import EGLinear
    from squeezeflow.kernels.intpack import pack_rows
    from squeezeflow.models import load_model

    try:
        import zstandard
        compress, zname = zstandard.ZstdCompressor(level=19).compress, "zstd-19"
    except ImportError:     # the test extra installs zstandard; fall back so the numbers still come out
        import lzma
        compress, zname = (lambda b: lzma.compress(b, preset=9)), "lzma-9"
    t0 = time.perf_counter()
    net = load_model(path, torch.float32)
    load_s = time.perf_counter() - t0
    out = {"weights": 0, "eg_stream_bytes": 0, "eg_table_bytes": 0, "eg_offset_bytes": 0, "fixed_bytes": 0,
           "zstd_bytes": 0, "decode_s": 0.0, "compressor": zname, "load_s": round(load_s, 2)}
    for _, m in sorted(net.named_modules()):
        if not isinstance(m, EGLinear):
            continue
        t = time.perf_counter()
        codes = m.decoded_codes()
        out["decode_s"] += time.perf_counter() - t
        bits = int(m.inner_params.get("bits", 8))
        fixed = pack_rows(codes.to(torch.int64), bits).numpy().tobytes()
        out["weights"] += codes.numel()
        out["eg_stream_bytes"] += m.stream.numel()
        out["eg_table_bytes"] += m.symbols.numel()
        out["eg_offset_bytes"] += 4 * m.offsets.numel()
        out["fixed_bytes"] += len(fixed)
        out["zstd_bytes"] += len(compress(fixed))
    n = max(out["weights"], 1)
    out["decode_s"] = round(out["decode_s"], 2)
    for k in ("eg_stream", "fixed", "zstd"):
        out[f"{k}_bits_per_code"] = round(8 * out[f"{k}_bytes"] / n, 4)
    out["eg_total_bits_per_code"] = round(8 * (out["eg_stream_bytes"] + out["eg_table_bytes"] + out["eg_offset_bytes"]) / n, 4)
    return out


def bf16_bytes(model_path: Path) -> int:
    """Bytes of every tensor of the base model in bf16 (the reference the papers' savings are against)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(model_path).glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                total += 2 * math.prod(st.get_slice(k).get_shape())
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipes", default="rf8,fp8-e4m3")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--kl-windows", type=int, default=0)
    ap.add_argument("--json", default=str(RESULTS), help="merge the results into this file")
    ap.add_argument("--sizes-only", default="", help="recipes to pack and size without evaluating (e.g. rf8-eg, "
                    "whose weights equal rf8's by construction)")
    args = ap.parse_args(argv)

    import torch

    from squeezeflow import pipeline
    from squeezeflow.config import CalibrationSpec, EvalSpec, ModelRef
    from squeezeflow.settings import store_uri
    from squeezeflow.store import open_store

    torch.set_num_threads(2)
    calib_spec = CalibrationSpec(n_samples=args.calib_samples)
    eval_spec = EvalSpec(max_windows=args.eval_windows, kl_windows=args.kl_windows)
    store = open_store(store_uri())
    path = Path(args.json)
    results = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    results.setdefault("commands", []).append(" ".join(["benchmarks/ggd_sweep.py", *(argv or sys.argv[1:])]))
    sizes_only = {r for r in args.sizes_only.split(",") if r}
    for recipe in [r for r in args.recipes.split(",") if r] + sorted(sizes_only):
        t0 = time.perf_counter()
        plan = pipeline.preflight(ModelRef(ref=args.model), recipe, calib_spec, eval_spec)
        if "fp32" not in results["runs"]:
            base = pipeline.evaluate_path(Path(plan.model.path), plan.model, eval_spec, "fp32")
            base["bf16_bytes"] = bf16_bytes(Path(plan.model.path))
            results["runs"]["fp32"] = base
            print(f"fp32: {base['perplexity']}", file=sys.stderr)
        calib = pipeline.calibrate(store, plan.model, plan.calibration)
        stats = pipeline.saliency(store, plan.model, calib, plan.statistics)
        t1 = time.perf_counter()
        _, packed = pipeline.compress_to_packed(store, plan, calib, stats)
        compress_s = time.perf_counter() - t1
        packed_path = store.materialize(packed)
        if recipe in sizes_only:
            from squeezeflow.evaluation.size import size_report

            m = {"recipe": recipe, "perplexity": None,
                 **size_report(packed_path, pipeline.target_linears(Path(plan.model.path)))}
        else:
            m = pipeline.evaluate_path(packed_path, plan.model, eval_spec, recipe)
        m["method"] = plan.recipe.methods[0].model_dump(mode="json")
        m["compress_s"] = round(compress_s, 1)
        m["size_vs_bf16"] = round(m["size_bytes"] / results["runs"]["fp32"]["bf16_bytes"], 4)
        if any(v.get("format") == "eg" for v in json.loads((packed_path / "config.json").read_text())
               ["quantization_config"]["modules"].values()):
            m["eg"] = eg_sizes(packed_path)
        if (packed_path / "backslash.json").exists():
            m["backslash"] = {k: v for k, v in json.loads((packed_path / "backslash.json").read_text()).items() if k != "log"}
        if plan.transforms:
            target = pipeline.transform(store, plan.model, plan.recipe, stats, calib)
            record = Path(target.path) / "backslash.json"
            if record.exists():
                m["backslash"] = json.loads(record.read_text())
        m["seconds"] = round(time.perf_counter() - t0, 1)
        results["runs"][recipe] = m
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1, sort_keys=True, default=str))
        print(f"{recipe}: {m['perplexity']} bits/w {m['bits_per_weight']:.3f} ({m['seconds']} s)", file=sys.stderr)
    print(table(results))
    return 0


def table(results: dict) -> str:
    runs = results["runs"]
    base = runs["fp32"]
    splits = sorted(base["perplexity"])
    head = ["recipe", *[f"ppl {s}" for s in splits], *[f"Δ {s}" for s in splits], "linear bits/w", "file MiB",
            "file / bf16", "EG bits/code", "fixed bits/code", "zstd bits/code"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in runs.items():
        eg = m.get("eg", {})
        ppl = m["perplexity"]
        row = [name, *[f"{ppl[s]:.3f}" if ppl else "(not evaluated)" for s in splits],
               *[f"{100 * (ppl[s] / base['perplexity'][s] - 1):+.2f}%" if ppl else "-" for s in splits],
               f"{m['bits_per_weight']:.3f}", f"{m['size_bytes'] / 2**20:.1f}",
               f"{m['size_bytes'] / base['bf16_bytes']:.3f}",
               f"{eg['eg_total_bits_per_code']:.3f}" if eg else "-", f"{eg['fixed_bits_per_code']:.3f}" if eg else "-",
               f"{eg['zstd_bits_per_code']:.3f}" if eg else "-"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
