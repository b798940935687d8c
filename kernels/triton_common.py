"""Helpers shared by the Triton kernel modules (kernels/triton_*.py)."""

from __future__ import annotations

import triton
from triton import knobs


def interpreted() -> bool:
    """True under TRITON_INTERPRET=1: kernels run as numpy on the CPU (the unit tests)."""
    return bool(knobs.runtime.interpret)


def autotune_unless_interpreted(configs, key):
    """``triton.autotune`` on a GPU; the plain kernel under the interpreter, where timing configs means
    nothing and the caller passes fixed (small) block sizes instead."""
    if interpreted():
        return lambda fn: fn
    return triton.autotune(configs=configs, key=key)
