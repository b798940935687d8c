"""Layer-removal baselines, all without retraining, at the same layer count as TRSP:

- ShortGPT: block influence BI_i = 1 − mean over calibration tokens of cos(x_in, x_out) (the statistics
  engine's block_io collector); remove the p·L blocks with the lowest influence, in one shot.
- SLEB-style: greedy rounds; each round removes the block whose removal raises calibration perplexity
  least, measured with the blocks already removed (one checkpointed round per block).
- Last layers: remove the p·L blocks just before the final one. The final block is kept: it maps the
  stream into the space lm_head reads, and removing it is known to be far worse (a weaker baseline).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from ...errors import BadInput
from ..base import RestructureContext
from ..registry import register
from .common import LayerPruneConfig, LayerPruneMethod, calibration_batches, load_dense, parse_layer_preset
from .gates import gate_model, save_pruned


class ShortGPTConfig(LayerPruneConfig):
    """ShortGPT: remove the blocks with the lowest block influence 1 − cos(x_in, x_out)."""

    method: Literal["shortgpt"] = "shortgpt"


class SLEBConfig(LayerPruneConfig):
    """SLEB-style: greedily remove the block whose removal raises calibration perplexity least."""

    method: Literal["sleb"] = "sleb"
    windows: int = Field(4, ge=1, le=100_000, description="Calibration windows scored per candidate")
    seqlen: int = Field(128, ge=8, description="Tokens per scored window")


class LastLayersConfig(LayerPruneConfig):
    """Remove the blocks just before the final one."""

    method: Literal["lastlayers"] = "lastlayers"


def presets_of(config_cls: type[LayerPruneConfig]):
    """`<method>-<percent>` (shortgpt-25, sleb-25, lastlayers-25); the -no-iter / -no-stage2 ablations are
    TRSP's only."""
    method = config_cls.model_fields["method"].default

    def parse(name: str) -> list | None:
        if (parsed := parse_layer_preset(name, method)) is None:
            return None
        ratio, flags = parsed
        if flags:
            raise BadInput(f"recipe {name!r}: -no-iter / -no-stage2 are TRSP ablations")
        return [config_cls(ratio=ratio)]

    return parse


@register(ShortGPTConfig, presets=presets_of(ShortGPTConfig), examples=("shortgpt-25",))
class ShortGPT(LayerPruneMethod):
    config: ShortGPTConfig

    def finish(self, src: Path, dst: Path, state: dict, ctx: RestructureContext) -> dict:
        influence = [b["influence"] for b in ctx.block_io()]
        n = self.n_remove(len(influence))
        removed = sorted(sorted(range(len(influence)), key=lambda i: influence[i])[:n])
        save_pruned(load_dense(src), src, dst, removed)
        return {"removed": removed, "influence": [round(v, 8) for v in influence]}


@torch.no_grad()
def calibration_nll(model: torch.nn.Module, batches: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token NLL over the batches (all positions labelled)."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for s in range(0, len(batches), batch_size):
        ids = batches[s:s + batch_size].to(device)   # the windows stay on the host, one batch moves
        n = ids[:, 1:].numel()
        total += float(model(input_ids=ids, labels=ids, use_cache=False).loss) * n
        count += n
    return total / count


@register(SLEBConfig, presets=presets_of(SLEBConfig), examples=("sleb-25",))
class SLEB(LayerPruneMethod):
    config: SLEBConfig

    def rounds(self, num_layers: int) -> int:
        return self.n_remove(num_layers)

    def run_round(self, src: Path, k: int, state: dict, ctx: RestructureContext) -> dict:
        started = time.perf_counter()
        model = load_dense(src, ctx.device)
        gates = gate_model(model)
        for i in state["selected"]:
            gates[i].masked = True
        batches = calibration_batches(ctx.windows, self.config.windows, self.config.seqlen)
        scores = {}
        for i in range(len(gates)):
            if gates[i].masked:
                continue
            gates[i].masked = True
            scores[i] = math.exp(calibration_nll(model, batches))
            gates[i].masked = False
        best = min(scores, key=lambda i: (scores[i], i))
        return {**state, "selected": state["selected"] + [best],
                "history": state.get("history", []) + [{"round": k, "picked": best, "ppl": round(scores[best], 6),
                                                        "seconds": round(time.perf_counter() - started, 2)}]}

    def finish(self, src: Path, dst: Path, state: dict, ctx: RestructureContext) -> dict:
        removed = sorted(state["selected"])
        save_pruned(load_dense(src), src, dst, removed)
        return {"removed": removed, "selection_order": state["selected"], "rounds": state.get("history", [])}


@register(LastLayersConfig, presets=presets_of(LastLayersConfig), examples=("lastlayers-25",))
class LastLayers(LayerPruneMethod):
    config: LastLayersConfig

    def finish(self, src: Path, dst: Path, state: dict, ctx: RestructureContext) -> dict:
        L = state["num_layers"]
        n = self.n_remove(L)
        removed = list(range(L - 1 - n, L - 1))
        save_pruned(load_dense(src), src, dst, removed)
        return {"removed": removed}
