"""diag(XᵀX) per linear: h_j = mean over calibration tokens of x_j², x the linear's input.

Accumulated in float64 (sums of many squares lose precision in fp32) with forward pre-hooks while one
decoder block processes all calibration windows.
"""
from __future__ import annotations

import contextlib

import torch

from ..models import decoder_linears
from ..moe import routed_token_counts
from .hooks import on_inputs


class HDiag:
    name = "hdiag"
    version = "1"

    def __init__(self, dtype: torch.dtype = torch.float64):
        self.dtype = dtype  # accumulation precision (compute.py's statistics dtype); sums stay on x's device
        self._sums: dict[str, torch.Tensor] = {}
        self._count: dict[str, int] = {}
        self._routed: dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def attach(self, layer: torch.nn.Module):
        self._sums, self._count = {}, {}

        def accumulate(name: str, x: torch.Tensor) -> None:
            x = x.reshape(-1, x.shape[-1]).to(self.dtype)
            self._sums[name] = self._sums.get(name, 0) + (x * x).sum(0)
            self._count[name] = self._count.get(name, 0) + x.shape[0]

        with on_inputs(decoder_linears(layer), accumulate):
            yield
        self._routed = routed_token_counts(layer)  # an MoE block's per-expert counts (moe.py's fallback rule)

    def result(self) -> dict[str, torch.Tensor]:
        return {**{name: (s / self._count[name]).float().cpu() for name, s in sorted(self._sums.items())},
                **self._routed}
