"""The compute setting resolved for this machine: which device the stages run on, in which precision.

`resolve(spec)` turns a requested ComputeSpec (device `auto` | `cpu` | `cuda[:N]`) into a concrete one,
refusing CUDA where there is none with one line (preflight calls it before any work). `auto` means
SQUEEZEFLOW_DEVICE when set, else CUDA when present, else CPU, and says which it picked.

The resolved spec rides on the job's ModelInfo to every stage (`stage_compute(model)`); the default
(cpu, fp32, fp64 statistics) is carried as None, so every cache key of a default run is what it was
before this setting existed.
"""
from __future__ import annotations

import logging
import os

import torch
from pydantic import ValidationError

from .config import ComputeSpec, one_line
from .errors import BadInput

log = logging.getLogger(__name__)

DEVICE_ENV = "SQUEEZEFLOW_DEVICE"
DEFAULT = ComputeSpec(device="cpu")  # today's behaviour: what a run without the setting computes
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve(spec: ComputeSpec | None = None) -> ComputeSpec:
    """`spec` with its device made concrete for this machine; BadInput when it asks for a GPU not here."""
    spec = spec or ComputeSpec()
    device = spec.device
    if device == "auto":
        env = os.environ.get(DEVICE_ENV, "").strip()
        if env and env != "auto":
            try:
                device = ComputeSpec(device=env).device
            except ValidationError as e:
                raise BadInput(f"{DEVICE_ENV}={env!r}: {one_line(e)}") from None
        else:
            device = "cuda:0" if cuda_count() else "cpu"
            log.info("compute device auto: %s", f"CUDA ({torch.cuda.get_device_name(0)})" if cuda_count()
                     else "cpu (no CUDA device here)")
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        n = cuda_count()
        if n == 0:
            raise BadInput(f"device {device!r} asked for, but this machine has no CUDA device "
                           f"(torch {torch.__version__}); use --device cpu or auto")
        if index >= n:
            raise BadInput(f"device {device!r} asked for, but this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
        device = f"cuda:{index}"
    return spec.model_copy(update={"device": device})


def carried(resolved: ComputeSpec) -> ComputeSpec | None:
    """What a job carries to its stages: None for the default (keys and dumps unchanged), else the spec."""
    return None if resolved == DEFAULT else resolved


def stage_compute(model) -> ComputeSpec:
    """The resolved compute of a stage's model input (DEFAULT when it carries none)."""
    return getattr(model, "compute", None) or DEFAULT


def device_of(spec: ComputeSpec) -> torch.device:
    return torch.device(spec.device)


def dtype_of(spec: ComputeSpec) -> torch.dtype:
    return TORCH_DTYPES[spec.dtype]


def stats_dtype_of(spec: ComputeSpec) -> torch.dtype:
    return TORCH_DTYPES[spec.stats_dtype]
