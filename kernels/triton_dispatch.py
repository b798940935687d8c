"""When the packed modules run their Triton kernels instead of the reference torch forward.

``SQUEEZEFLOW_KERNELS`` (read at every forward, so tests and benchmarks can flip it):

* ``auto`` (default): Triton on CUDA tensors when triton imports, the torch reference everywhere else;
* ``torch``: always the torch reference (dequantize, then ``F.linear``);
* ``triton``: always Triton. On CPU tensors that only works under ``TRITON_INTERPRET=1`` (the tests).

This module never imports triton itself: a CPU-only install without triton must keep working.
"""

from __future__ import annotations

import importlib.util
import os

import torch

ENV = "SQUEEZEFLOW_KERNELS"
MODES = ("auto", "torch", "triton")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def kernel_mode() -> str:
    mode = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV}={mode!r} is not one of {', '.join(MODES)}")
    return mode


def use_triton(x: torch.Tensor) -> bool:
    """Whether a packed module should run its Triton kernel on input ``x``."""
    mode = kernel_mode()
    if mode == "torch":
        return False
    if mode == "triton":
        return True
    return x.is_cuda and triton_available()
