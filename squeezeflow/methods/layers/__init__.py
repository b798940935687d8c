"""Layer removal: TRSP (trsp.py) and the ShortGPT, SLEB and last-layers baselines (baselines.py), built on
gated blocks and physical block deletion (gates.py) and the shared ratio config (common.py)."""
from __future__ import annotations

# TRSP first: import order is registration order, and so the order of the preset examples.
from .trsp import TRSP, TRSPConfig  # noqa: I001
from .baselines import SLEB, LastLayers, LastLayersConfig, ShortGPT, ShortGPTConfig, SLEBConfig
from .common import LayerPruneConfig, LayerPruneMethod

__all__ = ["SLEB", "TRSP", "LastLayers", "LastLayersConfig", "LayerPruneConfig", "LayerPruneMethod", "SLEBConfig",
           "ShortGPT", "ShortGPTConfig", "TRSPConfig"]
