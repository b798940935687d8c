"""Generalized-Gaussian coding: 8-bit float weight formats (RF8, FP8 e4m3; float8.py), exp-Golomb storage
of integer codes (`<preset>-eg`; entropy_coded.py), BackSlash's rate-constrained tuning (backslash.py), and
the GGD fits they build on (ggd.py)."""
from __future__ import annotations

from .backslash import BackSlash, BackSlashConfig
from .entropy_coded import EGConfig, EntropyCoded
from .float8 import FP8, RF8, Float8Config, FP8Config, RF8Config

__all__ = ["FP8", "RF8", "BackSlash", "BackSlashConfig", "EGConfig", "EntropyCoded", "FP8Config", "Float8Config",
           "RF8Config"]
