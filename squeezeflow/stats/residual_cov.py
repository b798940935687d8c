"""Second moment of the residual stream at every norm input of a block: E[x xᵀ] in fp64 (QUAD).

QUAD's outlier projection P is the top-r eigenvectors of this matrix pooled over both norms of every
block, so it is collected per norm and pooled afterwards by `pooled_residual_cov`. It is uncentered on
purpose: the rotation must capture the mean direction too (RMSNorm does not subtract a mean). Kept in
fp64 all the way, storage included, because the eigenvectors of a matrix with a huge dynamic range
(massive activations) are sensitive to rounding.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from .hooks import on_inputs

# The norms of a Llama-style block that read the residual stream (a Qwen3 q_norm/k_norm does not).
RESIDUAL_NORMS = ("input_layernorm", "post_attention_layernorm")


class ResidualCov:
    name = "residual_cov"
    version = "1"

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        self.dtype = dtype  # accumulation precision (compute.py's statistics dtype)
        self._sums: dict[str, torch.Tensor] = {}
        self._count: dict[str, int] = {}

    @contextlib.contextmanager
    def attach(self, layer: torch.nn.Module) -> Iterator[None]:
        self._sums, self._count = {}, {}
        missing = [n for n in RESIDUAL_NORMS if not isinstance(getattr(layer, n, None), torch.nn.Module)]
        if missing:
            raise ValueError(f"residual_cov needs a Llama-style block with {RESIDUAL_NORMS}; missing {missing}")

        def accumulate(name: str, x: torch.Tensor) -> None:
            x = x.reshape(-1, x.shape[-1]).to(self.dtype)
            if name not in self._sums:  # on the device the block runs on
                self._sums[name] = torch.zeros(x.shape[1], x.shape[1], dtype=self.dtype, device=x.device)
                self._count[name] = 0
            self._sums[name].addmm_(x.T, x)
            self._count[name] += x.shape[0]

        with on_inputs({n: getattr(layer, n) for n in RESIDUAL_NORMS}, accumulate):
            yield

    def result(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, s in sorted(self._sums.items()):
            out[name] = (s / self._count[name]).cpu()
            out[f"{name}.count"] = torch.tensor(self._count[name], dtype=torch.int64, device="cpu")
        return out


def pooled_residual_cov(store, stats_ref) -> torch.Tensor:
    """Token-weighted mean of E[x xᵀ] over every norm of every block (fp64): QUAD's pooled covariance.

    `stats_ref` is the "residual_cov" StatsRef returned by `collect`. Blocks are read one at a time.
    """
    total: torch.Tensor | None = None
    tokens = 0
    for ref in stats_ref.blocks:
        block = store.get_tensors(ref)
        for name in RESIDUAL_NORMS:
            n = int(block[f"{name}.count"])
            total = block[name] * n if total is None else total + block[name] * n
            tokens += n
    if total is None or tokens == 0:
        raise ValueError("residual_cov statistics hold no tokens")
    return total / tokens
