"""Broken model directories, one per way a checkpoint can be unusable, built from a micro Llama.

`make_micro_llama(dest)` writes a clean checkpoint (~60 KB of weights, 256-token vocabulary) that
`validate_checkpoint` accepts; `make_bad_checkpoint(kind, base, dest)` copies it and breaks it one way,
returning the path to hand to the CLI. BAD_CHECKPOINTS maps each kind to the text the one-line error
must contain.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"


def make_micro_llama(dest: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(dest, safe_serialization=True)
    (dest / "tokenizer.json").write_text("{}")
    return dest


# --- byte-level helpers -----------------------------------------------------------------------------
def _split(raw: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def _edit_header(d: Path, edit) -> None:
    header, data = _split((d / WEIGHTS).read_bytes())
    header = edit(header)
    (d / WEIGHTS).write_bytes(_join(header, data))


def _edit_config(d: Path, **changes) -> None:
    config = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            config.pop(k, None)
        else:
            config[k] = v
    (d / "config.json").write_text(json.dumps(config))


def _edit_tensors(d: Path, edit, dtype: torch.dtype | None = None) -> None:
    tensors = load_file(d / WEIGHTS)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    edit(tensors)
    save_file(tensors, d / WEIGHTS, metadata={"format": "pt"})


def _set(name: str, value: float):
    def edit(tensors):
        flat = tensors[name].view(-1)
        flat[flat.numel() // 2] = value
    return edit


def _shard(d: Path, index: dict | None = None, drop: str | None = None, both: str | None = None) -> None:
    """Split the weights into two shards with a standard index, then optionally break it."""
    tensors = load_file(d / WEIGHTS)
    (d / WEIGHTS).unlink()
    names = sorted(tensors)
    half = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
            "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    if both:
        half["model-00002-of-00002.safetensors"].append(both)
    for f, keys in half.items():
        save_file({k: tensors[k] for k in keys}, d / f, metadata={"format": "pt"})
    weight_map = {k: f for f, keys in half.items() for k in keys}
    weight_map.update(index or {})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if drop:
        (d / drop).unlink()


def _loop(p: Path) -> None:
    p.unlink(missing_ok=True)
    os.symlink(p.name + ".b", p)
    os.symlink(p.name, p.with_name(p.name + ".b"))


def _fifo(p: Path) -> None:
    p.unlink(missing_ok=True)
    os.mkfifo(p)


Q0 = "model.layers.0.self_attn.q_proj.weight"
Q1 = "model.layers.1.self_attn.q_proj.weight"

# kind -> (how to break a copy of the micro model, text the error must contain)
BAD_CHECKPOINTS = {
    # safetensors headers and files
    "header longer than the file": (lambda d: (d / WEIGHTS).write_bytes(
        (10**6).to_bytes(8, "little") + (d / WEIGHTS).read_bytes()[8:]), "is truncated: its header needs"),
    "file cut mid-tensor": (lambda d: (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes()[:-100]),
                            "is truncated: the header describes"),
    "header length over the limit": (lambda d: (d / WEIGHTS).write_bytes(
        (2**40).to_bytes(8, "little") + (d / WEIGHTS).read_bytes()[8:]), "over the format's limit"),
    "empty weights file": (lambda d: (d / WEIGHTS).write_bytes(b""), "not even the 8-byte header length"),
    "header not JSON": (lambda d: (d / WEIGHTS).write_bytes(
        (d / WEIGHTS).read_bytes()[:8] + b"\xff" * int.from_bytes((d / WEIGHTS).read_bytes()[:8], "little")
        + _split((d / WEIGHTS).read_bytes())[1]), "the safetensors header is not valid JSON"),
    "header a JSON list": (lambda d: (d / WEIGHTS).write_bytes(_join([1, 2], b"")), "is not a JSON object"),
    "unknown dtype": (lambda d: _edit_header(d, lambda h: {**h, Q0: {**h[Q0], "dtype": "Q4"}}), "unknown dtype 'Q4'"),
    "shape disagrees with offsets": (lambda d: _edit_header(d, lambda h: {**h, Q0: {**h[Q0], "shape": [33, 32]}}),
                                     "needs 4224 bytes"),
    "negative shape": (lambda d: _edit_header(d, lambda h: {**h, Q0: {**h[Q0], "shape": [-32, -32]}}),
                       "invalid shape"),
    "offsets reversed": (lambda d: _edit_header(d, lambda h: {**h, Q0: {**h[Q0], "data_offsets": h[Q0]["data_offsets"][::-1]}}),
                         "invalid data_offsets"),
    "tensors overlap": (lambda d: _edit_header(d, lambda h: {**h, Q1: {**h[Q1], "data_offsets": h[Q0]["data_offsets"]}}),
                        "tensors overlap or leave a gap"),
    "trailing bytes after the tensors": (lambda d: (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes() + b"\0" * 64),
                                         "longer than its tensors"),
    "metadata not strings": (lambda d: _edit_header(d, lambda h: {**h, "__metadata__": {"format": 1}}),
                             "__metadata__ must map strings"),
    "tensor named twice in a header": (lambda d: (d / WEIGHTS).write_bytes(
        (lambda h, data: (lambda t: len(t).to_bytes(8, "little") + t + data)(
            json.dumps(h).encode().replace(b"{", b'{"x": 1, "x": 2, ', 1)))(*_split((d / WEIGHTS).read_bytes()))),
        "is given twice"),
    # NaN / Inf weights, in each float width
    "NaN in an fp32 weight": (lambda d: _edit_tensors(d, _set(Q1, float("nan"))), f"tensor {Q1!r} holds NaN"),
    "Inf in a bf16 weight": (lambda d: _edit_tensors(d, _set("model.layers.0.mlp.down_proj.weight", float("inf")),
                                                     torch.bfloat16), "'model.layers.0.mlp.down_proj.weight' holds NaN or infinite"),
    "-Inf in an fp16 norm": (lambda d: _edit_tensors(d, _set("model.norm.weight", float("-inf")), torch.float16),
                             "'model.norm.weight' holds NaN or infinite"),
    "NaN in the embedding": (lambda d: _edit_tensors(d, _set("model.embed_tokens.weight", float("nan"))),
                             "'model.embed_tokens.weight' holds NaN"),
    # sharded checkpoints
    "dangling shard": (lambda d: _shard(d, drop="model-00002-of-00002.safetensors"), "which is missing"),
    "index names the wrong shard": (lambda d: _shard(d, index={Q0: "model-00002-of-00002.safetensors"}),
                                    "which does not hold it"),
    "tensor in two shards": (lambda d: _shard(d, both="model.embed_tokens.weight"), "is in both"),
    "index path escapes the directory": (lambda d: _shard(d, index={Q0: "../model-00001-of-00002.safetensors"}),
                                         "not a file name in the model directory"),
    "index not JSON": (lambda d: (_shard(d), (d / "model.safetensors.index.json").write_text("{weight_map: ")),
                       "model.safetensors.index.json is not valid JSON"),
    "index without weight_map": (lambda d: (_shard(d), (d / "model.safetensors.index.json").write_text("{}")),
                                 "has no weight_map"),
    # config against weights
    "config has more layers": (lambda d: _edit_config(d, num_hidden_layers=3), "num_hidden_layers=3, the weights hold 2"),
    "config has fewer layers": (lambda d: _edit_config(d, num_hidden_layers=1), "num_hidden_layers=1, the weights hold 2"),
    "config vocab size": (lambda d: _edit_config(d, vocab_size=300), "vocab_size=300"),
    "config hidden size": (lambda d: _edit_config(d, hidden_size=64), "config.json implies"),
    "config intermediate size": (lambda d: _edit_config(d, intermediate_size=48), "mlp"),
    "config head count": (lambda d: _edit_config(d, num_key_value_heads=4), "k_proj.weight"),
    "weights lack a tensor": (lambda d: _edit_tensors(d, lambda t: t.pop(Q1)), "lack 1 tensor(s)"),
    "weights hold an extra tensor": (lambda d: _edit_tensors(d, lambda t: t.update({"model.layers.0.extra.weight": torch.ones(2)})),
                                     "does not describe, e.g. model.layers.0.extra.weight"),
    "unknown model_type": (lambda d: _edit_config(d, model_type="llama9"), "unknown model_type 'llama9'"),
    "no model_type": (lambda d: _edit_config(d, model_type=None), "has no model_type"),
    "model_type not a causal LM": (lambda d: _edit_config(d, model_type="t5"), "is not a causal language model"),
    "config number as a string": (lambda d: _edit_config(d, num_hidden_layers="2"), "does not describe a buildable model"),
    "config.json not JSON": (lambda d: (d / "config.json").write_text("{'model_type': llama"), "config.json is not valid JSON"),
    "config.json a list": (lambda d: (d / "config.json").write_text("[]"), "config.json must hold a JSON object"),
    "config.json key twice": (lambda d: (d / "config.json").write_text('{"model_type": "llama", "model_type": "gpt2"}'),
                              "'model_type' is given twice"),
    "config.json not UTF-8": (lambda d: (d / "config.json").write_bytes(b'{"model_type": "\xff"}'), "is not UTF-8"),
    # files that are not regular files
    "config.json symlink loop": (lambda d: _loop(d / "config.json"), "config.json is a symlink loop"),
    "weights symlink loop": (lambda d: _loop(d / WEIGHTS), "model.safetensors is a symlink loop"),
    "weights dangling symlink": (lambda d: ((d / WEIGHTS).unlink(), os.symlink("gone.safetensors", d / WEIGHTS)),
                                 "model.safetensors does not exist"),
    "weights a FIFO": (lambda d: _fifo(d / WEIGHTS), "model.safetensors is a FIFO"),
    "weights are /dev/zero": (lambda d: ((d / WEIGHTS).unlink(), os.symlink("/dev/zero", d / WEIGHTS)),
                              "model.safetensors is a character device"),
    "tokenizer a FIFO": (lambda d: _fifo(d / "tokenizer.json"), "tokenizer.json is a FIFO"),
    "config.json a directory": (lambda d: ((d / "config.json").unlink(), (d / "config.json").mkdir()),
                                "config.json is a directory"),
    "no weights at all": (lambda d: (d / WEIGHTS).unlink(), "has no *.safetensors weights"),
}


def make_bad_checkpoint(kind: str, base: Path, dest: Path) -> Path:
    shutil.copytree(base, dest)
    BAD_CHECKPOINTS[kind][0](dest)
    return dest


def make_loop_dir(dest: Path) -> Path:
    """A model path that is itself a symlink loop."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(dest.name + ".b", dest)
    os.symlink(dest.name, dest.with_name(dest.name + ".b"))
    return dest
