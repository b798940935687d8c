"""Compression methods, one folder per family; each method file holds its config, its preset parser and
its `@register` call beside the algorithm. Importing this package registers every built-in family;
`get_method(config)` builds the method a recipe names (plugins included, via the `squeezeflow.methods`
entry point group).

    intq/    RTN, GPTQ (+ gptq_core)          nowag/   NoWag-P, Wanda, magnitude, NoWag-VQ (+ k-means)
    gwq.py   GWQ                              quad/    QUAD / QuaRot (transform, PEFT)
    gg/      RF8, FP8, exp-Golomb, BackSlash  layers/  TRSP, ShortGPT, SLEB, last layers
"""
from __future__ import annotations

# Import order is registration order: the order presets are tried in and PRESET_EXAMPLES lists them.
from . import intq, gwq, nowag, quad, layers, gg  # noqa: F401,I001 - imported to register
from .base import (CompressedLinear, LayerRemoval, RestructureContext, TransformsModel, TunesPacked, WeightMethod,
                   check_group_size)
from .registry import config_class, get_method, parse_preset, preset_examples, register, registrations

__all__ = ["CompressedLinear", "LayerRemoval", "RestructureContext", "TransformsModel", "TunesPacked", "WeightMethod",
           "check_group_size", "config_class", "get_method", "parse_preset", "preset_examples", "register",
           "registrations"]
