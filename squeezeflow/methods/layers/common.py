"""What the layer-removal methods share: the ratio config, the floor(ratio · L) count, the preset grammar
`<method>-<percent>` and the helpers that load the dense model and cut calibration windows.

A layer-removal method (base.LayerRemoval) is a sequence of checkpointable rounds followed by a finish step:
  state_0 = initial_state(L);  state_{k+1} = run_round(src, k, state_k, ctx);  finish(src, dst, state_n, ctx)
Each round is a pure function of the source checkpoint, the calibration windows and the previous
round's JSON state, so the trunk stores the state after every round and a killed run resumes at the
next one with an identical result (one Prefect task per round in the flow).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from pydantic import Field

from ...config import Spec
from ..base import LayerRemoval
from .gates import layers_to_remove


class LayerPruneConfig(Spec):
    """Structural layer removal: floor(ratio · L) decoder blocks are deleted (25% of 30 = 7), no retraining
    after removal. Runs before any weight method of the recipe."""

    ratio: float = Field(0.25, gt=0.0, lt=1.0, description="Fraction of decoder blocks removed (rounded down)")


class LayerPruneMethod(LayerRemoval):
    """Removes floor(ratio · L) blocks; subclasses choose which."""

    config: LayerPruneConfig

    def n_remove(self, num_layers: int) -> int:
        return layers_to_remove(self.config.ratio, num_layers)

    def check_layers(self, num_layers: int) -> int:
        return num_layers - self.n_remove(num_layers)


def parse_layer_preset(name: str, method: str) -> tuple[float, str] | None:
    """(ratio, ablation flags) of `<method>-<percent>[-no-iter][-no-stage2]`, or None when `name` is not
    one of `method`'s presets (trsp-25 = 25%, i.e. 7 of 30 blocks, rounded down)."""
    m = re.fullmatch(re.escape(method) + r"-(\d{1,2})((?:-no-iter|-no-stage2)*)", name)
    return (int(m.group(1)) / 100, m.group(2) or "") if m else None


def load_dense(src: Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The whole fp32 model for training/scoring on `device` (dropout off: eval mode even while training
    gates). fp32 whatever the job's dtype: the gates and stage 2 train with small steps."""
    from ...models import load_model

    return load_model(Path(src), torch.float32).to(device)


def calibration_batches(windows: torch.Tensor, n_windows: int, seqlen: int) -> torch.Tensor:
    """The first `n_windows` calibration windows cut to `seqlen` tokens (CPU budget knobs)."""
    return windows[:n_windows, :seqlen].contiguous()
