"""Compression methods, one module each. `get_method(config)` builds the method a recipe names."""
from __future__ import annotations

from .base import CompressedLinear, Method
from .gptq import GPTQ
from .backslash import BackSlash
from .entropy_coded import EntropyCoded
from .float8 import FP8, RF8
from .gwq import GWQ
from .layer_baselines import SLEB, LastLayers, ShortGPT
from .nowag_vq import NoWagVQ
from .prune import Magnitude, NoWagP, Wanda
from .quad import QUAD
from .rtn import RTN
from .trsp import TRSP

METHODS: dict[str, type[Method]] = {m.name: m for m in (RTN, GPTQ, GWQ, NoWagP, Wanda, Magnitude, NoWagVQ, QUAD)}
# Generalized-Gaussian coding: 8-bit float formats, exp-Golomb storage, BackSlash tuning.
METHODS |= {m.name: m for m in (RF8, FP8, EntropyCoded, BackSlash)}
# Structural methods (layer removal) change the model's shape; a recipe lists them before its weight method.
METHODS |= {m.name: m for m in (TRSP, ShortGPT, SLEB, LastLayers)}


def get_method(config) -> Method:
    return METHODS[config.method](config)


__all__ = ["METHODS", "CompressedLinear", "Method", "get_method"]
