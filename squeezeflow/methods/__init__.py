"""Compression methods, one module each. `get_method(config)` builds the method a recipe names."""
from __future__ import annotations

from .base import CompressedLinear, Method
from .gptq import GPTQ
from .gwq import GWQ
from .nowag_vq import NoWagVQ
from .prune import Magnitude, NoWagP, Wanda
from .quad import QUAD
from .rtn import RTN

METHODS: dict[str, type[Method]] = {m.name: m for m in (RTN, GPTQ, GWQ, NoWagP, Wanda, Magnitude, NoWagVQ, QUAD)}


def get_method(config) -> Method:
    return METHODS[config.method](config)


__all__ = ["METHODS", "CompressedLinear", "Method", "get_method"]
