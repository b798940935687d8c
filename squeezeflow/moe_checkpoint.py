"""Checkpoint tensor names of mixture-of-experts models, as the unfused skeleton (moe.py) names them.

MoE checkpoints come in two forms, and LayerStream reads both:
- Hub style, one matrix per expert: Qwen2-MoE / Qwen3-MoE `mlp.experts.E.{gate,up,down}_proj.weight` (already
  our names), Mixtral `block_sparse_moe.experts.E.w1/w2/w3.weight` and `block_sparse_moe.gate.weight`.
  transformers 5.25's `save_pretrained` writes this form for all three families (it reverses its own
  conversion on save).
- transformers-5 fused, as the model's state_dict holds them: `mlp.experts.gate_up_proj` [E, 2I, H] and
  `mlp.experts.down_proj` [E, H, I], split here into per-expert matrices (gate = rows [0, I), up = [I, 2I)).

The rules mirror transformers' conversion_mapping.py for these families (Mixtral: `.block_sparse_moe.` ->
`.mlp.`, w1 -> gate, w3 -> up, w2 -> down; Qwen2/3-MoE: per-expert names are merged into gate_up / down),
read in the other direction: to per-expert names. A fused tensor is read expert by expert with safetensors
slices, so no more than one expert's matrix is materialized per name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

MOE_TYPES = ("qwen2_moe", "qwen3_moe", "mixtral")
_MIXTRAL_EXPERT = re.compile(r"^(.*\.experts\.\d+)\.(w[123])\.(weight)$")
_MIXTRAL_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_FUSED = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


@dataclass(frozen=True)
class Source:
    """Where one (per-expert) tensor lives in the checkpoint: a whole tensor, or expert `expert` of a fused
    [E, ...] tensor, rows [start, stop) of that expert's matrix when given."""

    key: str
    expert: int | None = None
    rows: tuple[int, int] | None = None

    def read(self, st) -> torch.Tensor:
        """The tensor from an open safetensors file (`safe_open`)."""
        if self.expert is None:
            return st.get_tensor(self.key)
        part = st.get_slice(self.key)
        t = part[self.expert] if self.rows is None else part[self.expert, self.rows[0]:self.rows[1]]
        return t.contiguous()


def converted(model_type: str, key: str, shape: list[int]) -> list[tuple[str, Source, list[int]]]:
    """[(our name, source, shape)] for one checkpoint tensor: itself, renamed, or split per expert."""
    if model_type not in MOE_TYPES:
        return [(key, Source(key), list(shape))]
    name = key
    if model_type == "mixtral":
        name = name.replace(".block_sparse_moe.", ".mlp.")
        m = _MIXTRAL_EXPERT.match(name)
        if m:
            name = f"{m.group(1)}.{_MIXTRAL_PROJ[m.group(2)]}.{m.group(3)}"
    m = _FUSED.match(name)
    if m and len(shape) == 3:
        prefix, which = m.groups()
        e = shape[0]
        if which == "down_proj":
            return [(f"{prefix}.{i}.down_proj.weight", Source(key, i), list(shape[1:])) for i in range(e)]
        inter = shape[1] // 2
        return [(f"{prefix}.{i}.{proj}.weight", Source(key, i, rows), [inter, shape[2]])
                for i in range(e) for proj, rows in (("gate_proj", (0, inter)), ("up_proj", (inter, 2 * inter)))]
    return [(name, Source(key), list(shape))]


def canonical_shapes(model_type: str, shapes: dict[str, list[int]]) -> dict[str, list[int]]:
    """{our name: shape} for a checkpoint's {tensor name: shape}."""
    return {name: shp for key, shape in shapes.items() for name, _, shp in converted(model_type, key, shape)}
