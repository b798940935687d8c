"""The compute setting resolved for this machine: which device the stages run on, in which precision.

`resolve(spec)` turns a requested ComputeSpec (device `auto` | `cpu` | `cuda[:N]`) into a concrete one,
refusing CUDA where there is none with one line (preflight calls it before any work). `auto` means
SQUEEZEFLOW_DEVICE when set, else CUDA when present (one GPU, cuda:0), else CPU, and says which it picked.

Several GPUs: `cuda` means every visible GPU (CUDA_VISIBLE_DEVICES picks which, as for any CUDA program)
and stays `cuda` when there are more than one; `cuda:N` means that GPU alone; `cuda` on a one-GPU machine
is `cuda:0`. `devices_of(spec)` lists the devices a job spreads over: per-block tasks lease one of them
each (device_pool.py), sequential methods split their calibration forward across them
(stages/sequential_devices.py). Which GPU computes is not in any cache key (ComputeSpec.key_form).

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
            n = cuda_count()
            device = "cuda:0" if n else "cpu"
            log.info("compute device auto: %s", (f"CUDA ({torch.cuda.get_device_name(0)})" + (
                f"; {n} GPUs here, --device cuda uses them all" if n > 1 else "")) if n
                else "cpu (no CUDA device here)")
    if device.startswith("cuda"):
        n = cuda_count()
        if n == 0:
            raise BadInput(f"device {device!r} asked for, but this machine has no CUDA device "
                           f"(torch {torch.__version__}); use --device cpu or auto")
        device = resolve_cuda(device, n)
    return spec.model_copy(update={"device": device})


def resolve_cuda(device: str, n: int) -> str:
    """`cuda` -> every one of the `n` visible GPUs (`cuda`, or `cuda:0` when n == 1); `cuda:N` -> that one."""
    if device == "cuda":
        return "cuda" if n > 1 else "cuda:0"
    index = int(device.partition(":")[2])
    if index >= n:
        raise BadInput(f"device {device!r} asked for, but this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
    return f"cuda:{index}"


def devices_of(spec: ComputeSpec, n: int | None = None) -> list[str]:
    """The devices a resolved `spec` spreads over: cuda:0..cuda:n-1 for `cuda` (n visible GPUs), else its one."""
    if spec.device == "cuda":
        n = cuda_count() if n is None else n
        return [f"cuda:{i}" for i in range(max(1, n))]
    return [spec.device]


def carried(resolved: ComputeSpec) -> ComputeSpec | None:
    """What a job carries to its stages: None for the default (keys and dumps unchanged), else the spec."""
    return None if resolved == DEFAULT else resolved


def stage_compute(model) -> ComputeSpec:
    """The resolved compute of a stage's model input (DEFAULT when it carries none)."""
    return getattr(model, "compute", None) or DEFAULT


def device_of(spec: ComputeSpec) -> torch.device:
    """The job's primary device: for `cuda` (every GPU) the first, indexed, so device comparisons hold."""
    return torch.device(devices_of(spec, 1)[0])


def dtype_of(spec: ComputeSpec) -> torch.dtype:
    return TORCH_DTYPES[spec.dtype]


def stats_dtype_of(spec: ComputeSpec) -> torch.dtype:
    return TORCH_DTYPES[spec.stats_dtype]
