"""Compression methods, one module each. `get_method(config)` builds the method a recipe names."""
from __future__ import annotations

from .base import CompressedLinear, Method
from .gptq import GPTQ
from .rtn import RTN

METHODS: dict[str, type[Method]] = {RTN.name: RTN, GPTQ.name: GPTQ}


def get_method(config) -> Method:
    return METHODS[config.method](config)


__all__ = ["METHODS", "CompressedLinear", "Method", "get_method"]
