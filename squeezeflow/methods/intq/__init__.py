"""Group-wise integer grids packed as the `intq` format: RTN (round to nearest) and GPTQ (second-order
error compensation, gptq_core, which GWQ, QUAD and the float8 GPTQ encoders reuse)."""
from __future__ import annotations

from .gptq import GPTQ, GPTQConfig
from .rtn import RTN, IntGridConfig, RTNConfig

__all__ = ["GPTQ", "RTN", "GPTQConfig", "IntGridConfig", "RTNConfig"]
