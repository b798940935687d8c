"""The interface of structural methods: methods that change the model's shape (layer removal) instead of
compressing its linears. They run through the pipeline's transform hook, before any weight method.

A structural method is a sequence of checkpointable rounds followed by a finish step:
  state_0 = initial_state(L);  state_{k+1} = run_round(src, k, state_k, ctx);  finish(src, dst, state_n, ctx)
Each round is a pure function of the source checkpoint, the calibration windows and the previous
round's JSON state, so the pipeline stores the state after every round and a killed run resumes at the
next one with an identical result (pipeline.restructure; one Prefect task per round in the flow).
"""
from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .base import CompressedLinear, Method
from .layer_gates import layers_to_remove


@dataclass
class RestructureContext:
    """What a round may read: the calibration windows and, lazily, block statistics of the source."""

    windows: torch.Tensor                      # [n, seqlen] token ids
    block_io: Callable[[], list[dict]] | None = None  # per block: {cos, influence, norm_in, ...} (floats)


class StructuralMethod(Method):
    structural = True
    transforms_model = True
    layerwise = True

    def n_remove(self, num_layers: int) -> int:
        return layers_to_remove(self.config.ratio, num_layers)

    def check_layers(self, num_layers: int) -> int:
        """Preflight: the number of layers left after this method (BadInput when it cannot run)."""
        return num_layers - self.n_remove(num_layers)

    def rounds(self, num_layers: int) -> int:
        """How many checkpointed rounds run before `finish` (0: the method is a single step)."""
        return 0

    def initial_state(self, num_layers: int) -> dict:
        return {"num_layers": num_layers, "selected": []}

    def run_round(self, src: Path, k: int, state: dict, ctx: RestructureContext) -> dict:
        """One selection round (only methods whose `rounds` is above 0 define it: SLEB, TRSP)."""
        raise TypeError(f"{self.name} runs in a single step (rounds = 0); the pipeline never calls run_round")

    @abstractmethod
    def finish(self, src: Path, dst: Path, state: dict, ctx: RestructureContext) -> dict:
        """Write the pruned checkpoint to `dst`; returns the record for the manifest (removed layers...)."""

    # Structural methods compress no linear: the weight-method stages never call these.
    def compress_linear(self, name: str, weight: torch.Tensor, stats: dict[str, torch.Tensor]) -> CompressedLinear:
        raise TypeError(f"{self.name} is a structural method; it does not compress linears")

    def dequantize(self, c: CompressedLinear) -> torch.Tensor:
        raise TypeError(f"{self.name} is a structural method; it does not compress linears")


def load_dense(src: Path) -> torch.nn.Module:
    """The whole fp32 model for training/scoring (dropout off: eval mode even while training gates)."""
    from ..models import load_model

    return load_model(Path(src), torch.float32)


def calibration_batches(windows: torch.Tensor, n_windows: int, seqlen: int) -> torch.Tensor:
    """The first `n_windows` calibration windows cut to `seqlen` tokens (CPU budget knobs)."""
    return windows[:n_windows, :seqlen].contiguous()
