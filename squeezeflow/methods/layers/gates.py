"""Gated decoder blocks and physical layer removal: the shared machinery of the layer-pruning methods.

A gated block computes out = x + S · (block(x) − x): S scales the block's whole residual contribution
(attention and MLP together), so S = 1 is the original block and S = 0 is exactly the identity, i.e.
the block removed (METHODS.md "TRSP"; the released TRSP code scales the post-residual state instead,
which is not a removal at S = 0). A masked block is skipped outright, so its cost and its KV cache
entry disappear as they will after removal.

`delete_layers` removes blocks from an in-memory model and renumbers `self_attn.layer_idx` (the KV
cache is indexed by it); `save_pruned` writes the result as a plain, shallower HF checkpoint that any
consumer loads with AutoModelForCausalLM, without Squeezeflow.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch

from ...errors import BadInput


class GatedBlock(torch.nn.Module):
    """out = x + S · (block(x) − x), S a learnable scalar initialised to 1; `masked` skips the block."""

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.block = block
        device = next((p.device for p in block.parameters()), torch.device("cpu"))   # the gate lives with its block
        self.gate = torch.nn.Parameter(torch.ones((), dtype=torch.float32, device=device))
        self.masked = False
        self.transfer_norm: torch.Tensor | None = None  # mean ‖out − x‖₂ of the last forward (stage 2)
        self.record_transfer = False

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self.masked:
            return hidden_states
        y = self.block(hidden_states, *args, **kwargs)
        y = y[0] if isinstance(y, tuple) else y
        update = y - hidden_states
        if self.record_transfer:
            self.transfer_norm = update.norm(dim=-1).mean()
        # x + S·(y − x), written as y + (S − 1)·(y − x): the same function and gradient, but exactly y at
        # S = 1 in floating point (x + (y − x) rounds), so an ungated-equivalent model is bit-identical.
        return y + (self.gate.to(update.dtype) - 1) * update


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers"):
        raise BadInput("layer pruning needs a decoder with model.layers (Llama-style)")
    return inner.layers


def gate_model(model: torch.nn.Module) -> list[GatedBlock]:
    """Wrap every decoder block of `model` in a GatedBlock (in place); returns the gates in order."""
    layers = decoder_layers(model)
    gated = [b if isinstance(b, GatedBlock) else GatedBlock(b) for b in layers]
    for i, g in enumerate(gated):
        layers[i] = g
    return gated


def ungate_model(model: torch.nn.Module) -> None:
    """Put the plain blocks back (gates dropped)."""
    layers = decoder_layers(model)
    for i, b in enumerate(layers):
        if isinstance(b, GatedBlock):
            layers[i] = b.block


def layers_to_remove(ratio: float, num_layers: int) -> int:
    """floor(ratio · L): 25% of SmolLM2's 30 layers is 7 (Python's round would give 8 at 7.5)."""
    if not 0.0 < ratio < 1.0:
        raise BadInput(f"layer pruning ratio must be between 0 and 1 (exclusive), got {ratio}")
    n = math.floor(ratio * num_layers + 1e-9)
    if n < 1:
        raise BadInput(f"ratio {ratio} of {num_layers} layers removes no layer; use a ratio of at least {1 / num_layers:.3f}")
    if n >= num_layers:
        raise BadInput(f"ratio {ratio} would remove all {num_layers} layers")
    return n


def delete_layers(model: torch.nn.Module, removed: list[int]) -> None:
    """Delete decoder blocks `removed` from `model` in place, renumber layer_idx, shrink the config."""
    layers = decoder_layers(model)
    n = len(layers)
    bad = sorted(i for i in removed if not 0 <= i < n)
    if bad or len(set(removed)) != len(removed) or len(removed) >= n:
        raise BadInput(f"cannot remove layers {sorted(removed)} of a model with {n} layers")
    keep = [b for i, b in enumerate(layers) if i not in set(removed)]
    model.model.layers = torch.nn.ModuleList(keep)
    for new_idx, block in enumerate(keep):
        block = block.block if isinstance(block, GatedBlock) else block
        attn = getattr(block, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_idx   # the KV cache is indexed by it
        if hasattr(block, "layer_idx"):
            block.layer_idx = new_idx
    config = model.config
    config.num_hidden_layers = len(keep)
    # Per-layer lists in the config (layer_types of hybrid-attention models) lose the same entries.
    for attr in ("layer_types", "sliding_window_pattern_list", "no_rope_layers"):
        value = getattr(config, attr, None)
        if isinstance(value, (list, tuple)) and len(value) == n:
            setattr(config, attr, [v for i, v in enumerate(value) if i not in set(removed)])


def save_pruned(model: torch.nn.Module, src: Path, dst: Path, removed: list[int]) -> None:
    """Remove `removed` from `model` (loaded from `src`) and save a plain HF checkpoint in `dst`
    (safetensors, no quantization_config), with `src`'s tokenizer files."""
    ungate_model(model)
    delete_layers(model, removed)
    model.to("cpu")   # a model trained on a device is written from host memory (a no-op on CPU)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst, safe_serialization=True)
    for f in sorted(Path(src).iterdir()):
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config", "chat_template")):
            shutil.copyfile(f, dst / f.name)
