"""One llm-compressor `oneshot` run, in llm-compressor's own virtual environment (never imports squeezeflow).

Started by benchmarks/peers.py, one process per configuration, so each run has its own wall time and peak
RSS. Reads the model directory and the calibration token windows (a safetensors file holding `input_ids`
[n, seqlen], built by our pipeline), runs oneshot, and writes the result as a plain dense HF safetensors
directory: the weights as llm-compressor left them (fake-quantized or pruned, fp32), the source model's
config.json (so no quantization_config: our loader reads it as a dense model) and tokenizer files. Prints
one JSON line (prefixed `RESULT `) with timings, the resolved modifier and library versions.

    python peer_llmcompressor_worker.py --config gptq-w4g64 --model DIR --calib calib.safetensors --out DIR
    python peer_llmcompressor_worker.py --versions
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import re
import shutil
import sys
import time
from pathlib import Path

CONFIGS = ("gptq-w4g64", "gptq-w3g64", "gptq-w4g64-act-mse", "gptq-w3g64-act-mse", "wanda-p50", "sparsegpt-p50")
DAMP = 0.01          # our GPTQ default: damping as a fraction of mean diag(XᵀX)
BLOCK_SIZE = 128     # our GPTQ default: columns per lazy-update block
# Every Linear of the decoder blocks; lm_head (tied to the embedding) is left alone, as ours does.
TARGETS = ["Linear"]
IGNORE = ["lm_head"]
# The pruning modifiers match `ignore` against "<target name>.<submodule name>", which for a Linear target
# is "lm_head." (trailing dot): a plain "lm_head" does not match and they prune lm_head, i.e. the tied
# embedding (seen with 0.14.0.1; peers.py's check catches it). A regex prefix match does.
IGNORE_PRUNE = ["re:.*lm_head"]


def peak_rss_mib() -> float | None:
    """This process's own peak RSS (VmHWM). Not the parent's wait4 ru_maxrss: on Linux that never reads below
    the parent's own peak at fork time, which would hide a small child behind a large parent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for lib in ("torch", "transformers", "llmcompressor", "compressed-tensors", "datasets", "accelerate"):
        try:
            out[lib] = md.version(lib)
        except md.PackageNotFoundError:
            out[lib] = None
    return out


def build_modifier(config: str):
    """The llm-compressor modifier for one of CONFIGS, built explicitly (no preset scheme: W4A16's group
    of 128 does not divide SmolLM2's 576 inputs)."""
    # -act-mse: their static activation ordering and MSE observer, the counterparts of our
    # gptq-...-act-mse (act-order with grids fitted up front, per-group clip search).
    if m := re.fullmatch(r"gptq-w(\d)g(\d+)(-act-mse)?", config):
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from llmcompressor.modifiers.gptq import GPTQModifier

        actorder, observer = ("static", "memoryless_mse") if m.group(3) else (None, "memoryless_minmax")
        weights = QuantizationArgs(num_bits=int(m.group(1)), type="int", symmetric=False, strategy="group",
                                   group_size=int(m.group(2)), actorder=actorder, observer=observer)
        scheme = QuantizationScheme(targets=TARGETS, weights=weights, input_activations=None,
                                    output_activations=None)
        return GPTQModifier(config_groups={"group_0": scheme}, ignore=IGNORE, block_size=BLOCK_SIZE,
                            dampening_frac=DAMP, actorder=actorder)
    if m := re.fullmatch(r"(wanda|sparsegpt)-p(\d+)", config):
        sparsity = int(m.group(2)) / 100
        if m.group(1) == "wanda":
            from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier

            return WandaPruningModifier(sparsity=sparsity, mask_structure="0:0", targets=TARGETS, ignore=IGNORE_PRUNE)
        from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

        return SparseGPTModifier(sparsity=sparsity, mask_structure="0:0", targets=TARGETS, ignore=IGNORE_PRUNE,
                                 block_size=BLOCK_SIZE, dampening_frac=DAMP)
    raise SystemExit(f"unknown config {config!r}: use one of {', '.join(CONFIGS)}")


def describe(modifier) -> dict:
    """The modifier's resolved settings (lifecycle flags left out), None values kept: actorder=None matters."""
    out = {"class": type(modifier).__name__}
    for k, v in json.loads(modifier.model_dump_json(exclude={"config_groups"})).items():
        if not k.endswith("_") and k != "requires_calibration_data":
            out[k] = v
    if getattr(modifier, "config_groups", None):
        out["config_groups"] = {k: json.loads(v.model_dump_json()) for k, v in modifier.config_groups.items()}
    return out


def save_dense(model, src: Path, out: Path) -> None:
    """The model's tensors under the source checkpoint's names, fp32, plus the source config (no
    quantization_config) and tokenizer files: a dense checkpoint any HF loader reads."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    state = model.state_dict()
    with safe_open(src / "model.safetensors", "pt") as f:
        names = list(f.keys())
    missing = [n for n in names if n not in state]
    if missing:
        raise SystemExit(f"the compressed model lacks {len(missing)} tensors of the source, e.g. {missing[:3]}")
    tensors = {n: state[n].detach().to("cpu", torch.float32).contiguous().clone() for n in names}
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in sorted(src.iterdir()):
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config", "chat_template")):
            shutil.copyfile(f, out / f.name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=CONFIGS)
    ap.add_argument("--model", type=Path, help="source HF directory (fp32 safetensors)")
    ap.add_argument("--calib", type=Path, help="safetensors file with input_ids [n, seqlen]")
    ap.add_argument("--out", type=Path, help="output directory (dense HF checkpoint)")
    ap.add_argument("--versions", action="store_true", help="print library versions as JSON and exit")
    args = ap.parse_args()
    if args.versions:
        print("RESULT " + json.dumps(versions(), sort_keys=True))
        return 0
    if not (args.config and args.model and args.calib and args.out):
        ap.error("--config, --model, --calib and --out are required")

    t0 = time.perf_counter()
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_import = time.perf_counter()
    ids = load_file(str(args.calib))["input_ids"]
    if ids.dtype != torch.int64 or ids.ndim != 2:
        raise SystemExit(f"{args.calib}: input_ids must be int64 [n, seqlen], got {ids.dtype} {tuple(ids.shape)}")
    n, seqlen = ids.shape
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    modifier = build_modifier(args.config)
    t_load = time.perf_counter()
    # Sequential pipeline with error propagation (the default): block i calibrates on activations that went
    # through the already-compressed blocks 0..i-1, as our compress_sequential does. No shuffling, batch 1:
    # every window is used exactly once, in order.
    model = oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=modifier, num_calibration_samples=n,
                    max_seq_length=seqlen, shuffle_calibration_samples=False, batch_size=1, pipeline="sequential",
                    output_dir=None)
    t_oneshot = time.perf_counter()
    save_dense(model, args.model, args.out)
    t_save = time.perf_counter()
    result = {
        "config": args.config,
        "modifier": describe(modifier),
        "oneshot": {"pipeline": "sequential", "propagate_error": True, "batch_size": 1, "num_calibration_samples": n,
                    "max_seq_length": seqlen, "shuffle_calibration_samples": False},
        "calibration_windows": [n, seqlen],
        "seconds": {"import": round(t_import - t0, 2), "load": round(t_load - t_import, 2),
                    "oneshot": round(t_oneshot - t_load, 2), "save": round(t_save - t_oneshot, 2),
                    "total": round(t_save - t0, 2)},
        "peak_rss_mib": peak_rss_mib(),
        "torch_threads": torch.get_num_threads(),
        "versions": versions(),
    }
    print("RESULT " + json.dumps(result, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
