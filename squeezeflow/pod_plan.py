"""A flow-run pod sized by the memory plan: the Kubernetes work pool's job variables (gpu_count, memory
request and limit, and for a CPU-only run no GPU node) that a job needs, worked out where the job is
submitted, before the pod exists: a pod cannot grow once its flow runs, and the preflight inside it would
refuse a job its cgroup cannot hold. The plan reads the checkpoint's safetensors headers and the settings
only; no GPU is needed here to plan a GPU pod.

    squeezeflow plan MODEL --recipe R --pod 2              # the job variables, to pass with --job-variable
    squeezeflow submit compress/compress-k8s MODEL --recipe R --gpus 2   # plans, then starts the run
"""
from __future__ import annotations

import math
from pathlib import Path

from .errors import BadInput

GIB = 1 << 30
DEFAULT_GPU_MEMORY = 80 * GIB   # an H100 / A100 80 GB


def device_for(gpus: int) -> str:
    """The flow's compute device for a pod with `gpus` GPUs: every GPU for several (device_pool.py), else one."""
    return "cpu" if gpus == 0 else ("cuda" if gpus > 1 else "cuda:0")


def job_variables(job, config, gpus: int, gpu_bytes: int = DEFAULT_GPU_MEMORY) -> dict:
    """{"gpu_count", "memory_request", "memory_limit"[, "node_selector", "tolerations"]} for `job` (validated
    on this machine with any device) run in a pod with `gpus` GPUs of `gpu_bytes` each; BadInput (one line,
    with the numbers) when a stage's working set does not fit one GPU. The memory asked for is the host peak
    the pod's own preflight will plan (memory_plan.py), over its headroom, in whole GiB: request and limit
    alike, so the pod is not evicted for using what it asked for."""
    from . import memory_plan
    from .config import ComputeSpec

    if gpus < 0:
        raise BadInput(f"--gpus must be 0 or more, got {gpus}")
    compute = ComputeSpec(device=device_for(gpus), dtype=job.compute.dtype, stats_dtype=job.compute.stats_dtype)
    pod_job = job.on(compute)
    s = memory_plan.shapes(Path(job.model.path), config)
    top = max(memory_plan.stage_peaks(s, pod_job), key=lambda p: p.bytes)
    if gpus == 0:
        host = top.bytes
    else:
        device = top.bytes - memory_plan.FIXED_OVERHEAD
        if device > gpu_bytes * memory_plan.HEADROOM:
            raise BadInput(f"{job.model.name} with {job.recipe.name} needs ~{device / GIB:.1f} GiB of GPU memory at the "
                           f"{top.stage} stage ({top.what}), over a {gpu_bytes / GIB:.1f} GiB GPU; more GPUs do not "
                           f"help (a block is on one GPU): use --dtype bf16, fewer calibration windows or larger GPUs")
        # Each GPU's block passes through host memory on its way from the file: one more per extra GPU.
        host = memory_plan.host_beside_device(s, pod_job) + (gpus - 1) * s.block_params * memory_plan.COMPUTE_BYTES[
            compute.dtype]
    memory = f"{math.ceil(host / memory_plan.HEADROOM / GIB)}Gi"
    out = {"gpu_count": gpus, "memory_request": memory, "memory_limit": memory}
    if gpus == 0:   # any node: the pool's defaults select GPU nodes
        out.update(node_selector={}, tolerations=[])
    return out
