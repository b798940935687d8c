"""A packed artifact larger than S3's 5 GiB single-request limit, end to end: compress (plain stage calls,
evaluation included), sharded packing, publish to an embedded SeaweedFS of its own, pull, verify.

The model is random and shaped to be big where compression does not reach: a 49152 x 14336 embedding and
an untied head of the same shape (fp32, 5.64 GB together, kept in the base dtype by every recipe), and two
decoder blocks with 64-wide attention and MLP (compressed by the recipe). Everything lives in one temporary
directory (cache, store, registry data, scratch), removed at the end.

    .venv/bin/python -P benchmarks/large_artifact.py --max-shard-size 4GB --json benchmarks/results/large_artifact.json

Prints a table and writes JSON: bytes per shard, the largest shard against the limit, wall time per phase
(build, compress+evaluate, publish, pull+verify) and the process's peak RSS.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

GIB = 1 << 30


def build_model(dest: Path, tokenizer_src: Path, vocab: int, hidden: int) -> int:
    """Write the random checkpoint tensor by tensor (no model object: 5.6 GB once, not twice)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    small = 64
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=small, num_hidden_layers=2,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=small, max_position_embeddings=512,
                         tie_word_embeddings=False, dtype="float32")
    g = torch.Generator().manual_seed(0)
    state = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g) * 0.02,
             "lm_head.weight": torch.randn(vocab, hidden, generator=g) * 0.02,
             "model.norm.weight": torch.ones(hidden)}
    shapes = {"self_attn.q_proj": (small, hidden), "self_attn.k_proj": (small, hidden),
              "self_attn.v_proj": (small, hidden), "self_attn.o_proj": (hidden, small),
              "mlp.gate_proj": (small, hidden), "mlp.up_proj": (small, hidden), "mlp.down_proj": (hidden, small)}
    for i in range(2):
        for name, shape in shapes.items():
            state[f"model.layers.{i}.{name}.weight"] = torch.randn(*shape, generator=g) * 0.02
        for norm in ("input_layernorm", "post_attention_layernorm"):
            state[f"model.layers.{i}.{norm}.weight"] = torch.ones(hidden)
    dest.mkdir(parents=True)
    save_file(state, dest / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(dest)
    AutoTokenizer.from_pretrained(tokenizer_src).save_pretrained(dest)
    return sum(t.numel() * t.element_size() for t in state.values())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-shard-size", default="4GB")
    ap.add_argument("--recipe", default="rtn-w4g64")
    ap.add_argument("--hidden", type=int, default=14336)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="sqf-large-"))
    for var, sub in (("SQUEEZEFLOW_SERVICES", "services"), ("SQUEEZEFLOW_STORE", "store"),
                     ("SQUEEZEFLOW_SCRATCH", "scratch")):
        os.environ[var] = str(root / sub)
    os.environ.pop("SQUEEZEFLOW_REGISTRY", None)
    from squeezeflow import pipeline
    from squeezeflow.config import CalibrationSpec, EvalSpec, ModelRef
    from squeezeflow.models import prepare_model
    from squeezeflow.registry import open_registry
    from squeezeflow.services import stop as stop_services
    from squeezeflow.shards import parse_size, weight_files
    from squeezeflow.store import LocalStore

    limit = parse_size(args.max_shard_size)
    phases: dict[str, float] = {}
    try:
        t = time.perf_counter()
        base_bytes = build_model(root / "model", prepare_model("smollm2-135m").path, 49152, args.hidden)
        phases["build_s"] = time.perf_counter() - t

        t = time.perf_counter()
        job = pipeline.preflight(ModelRef(ref=str(root / "model")), args.recipe,
                                 CalibrationSpec(n_samples=2, seqlen=64), EvalSpec(seqlen=64, max_windows=1, kl_windows=0),
                                 max_shard_size=limit)
        store = LocalStore(root / "store")
        out = pipeline.run_job(job, store, registry=pipeline.registry_for(None))
        phases["compress_evaluate_publish_s"] = time.perf_counter() - t
        artifact = store.materialize(out["artifact"])
        shards = {f.name: f.stat().st_size for f in weight_files(artifact)}

        t = time.perf_counter()
        pulled = open_registry(None).pull(out["entry"]["uri"], root / "pulled")
        mismatched = [n for n in shards if sha256_file(pulled / n) != sha256_file(artifact / n)]
        phases["pull_verify_s"] = time.perf_counter() - t
        result = {"model_bytes": base_bytes, "recipe": args.recipe, "max_shard_bytes": limit,
                  "packed_bytes": sum(shards.values()), "shards": shards,
                  "largest_shard_bytes": max(shards.values()), "uri": out["entry"]["uri"],
                  "pulled_files_equal": not mismatched, **{k: round(v, 1) for k, v in phases.items()},
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    finally:
        stop_services()
        shutil.rmtree(root, ignore_errors=True)

    print(f"{'packed artifact':<28}{result['packed_bytes'] / GIB:10.2f} GiB in {len(shards)} shards")
    print(f"{'largest shard / limit':<28}{result['largest_shard_bytes'] / GIB:10.2f} / {limit / GIB:.2f} GiB")
    for k in phases:
        print(f"{k:<28}{result[k]:10.1f}")
    print(f"{'pulled files equal':<28}{str(result['pulled_files_equal']):>10}")
    print(f"{'peak RSS':<28}{result['peak_rss_bytes'] / GIB:10.2f} GiB")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    ok = result["packed_bytes"] > 5 * GIB and result["largest_shard_bytes"] <= limit and result["pulled_files_equal"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
