"""Compression methods, one module each. `get_method(config)` builds the method a recipe names."""
from __future__ import annotations

from .base import CompressedLinear, Method
from .gptq import GPTQ
from .prune import Magnitude, NoWagP, Wanda
from .rtn import RTN

METHODS: dict[str, type[Method]] = {m.name: m for m in (RTN, GPTQ, NoWagP, Wanda, Magnitude)}


def get_method(config) -> Method:
    return METHODS[config.method](config)


__all__ = ["METHODS", "CompressedLinear", "Method", "get_method"]
