"""Per-block input/output summaries for layer pruning (ShortGPT's block influence, SLEB, TRSP baselines).

For every calibration token, with x the block's input hidden state and y its output:
  cos          mean over tokens of cos(x, y)
  influence    1 - cos (ShortGPT's Block Influence: small means the block barely turns the stream)
  norm_in      mean ‖x‖₂,  norm_out  mean ‖y‖₂,  norm_update  mean ‖y - x‖₂ (the residual update)
  count        tokens seen
All 0-d tensors, accumulated and stored in fp64 (means over many tokens).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

_SUMS = ("cos", "norm_in", "norm_out", "norm_update")


class BlockIO:
    name = "block_io"
    version = "1"

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        self.dtype = dtype  # accumulation precision (compute.py's statistics dtype)
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0

    @contextlib.contextmanager
    def attach(self, layer: torch.nn.Module) -> Iterator[None]:
        self._sums = {k: torch.zeros((), dtype=self.dtype, device="cpu") for k in _SUMS}
        self._count = 0

        def hook(_mod, args, kwargs, output) -> None:
            # LayerStream passes the hidden states positionally; other callers may name them.
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            x = x.detach().reshape(-1, x.shape[-1]).to(self.dtype)
            y = y.detach().reshape(-1, y.shape[-1]).to(self.dtype)
            # Sums are four host scalars: a block on a GPU adds its partial sums here (no-op on CPU).
            self._sums["cos"] += torch.nn.functional.cosine_similarity(x, y, dim=-1).sum().cpu()
            self._sums["norm_in"] += x.norm(dim=-1).sum().cpu()
            self._sums["norm_out"] += y.norm(dim=-1).sum().cpu()
            self._sums["norm_update"] += (y - x).norm(dim=-1).sum().cpu()
            self._count += x.shape[0]

        handle = layer.register_forward_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def result(self) -> dict[str, torch.Tensor]:
        if self._count == 0:
            raise RuntimeError("block_io saw no tokens: was the block run while attached?")
        out = {k: s / self._count for k, s in self._sums.items()}
        out["influence"] = 1.0 - out["cos"]
        out["count"] = torch.tensor(self._count, dtype=torch.int64, device="cpu")
        return out
