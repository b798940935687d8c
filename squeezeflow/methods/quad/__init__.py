"""QUAD (and QuaRot, r = 0): a function-preserving expand-and-rotate transform of the dense checkpoint
(transform.py), GPTQ weights with fp16 outlier columns and activation fake-quant (quad.py), and an
optional PEFT of the packed checkpoint (peft.py)."""
from __future__ import annotations

from .quad import QUAD, QUADConfig

__all__ = ["QUAD", "QUADConfig"]
