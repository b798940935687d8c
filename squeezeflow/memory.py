"""How many decoder blocks may be compressed at once: one block's estimated peak against the memory
available, on the host (cgroup limit, MemAvailable) and, for a GPU job, on the device.

The per-block fan-out used to submit every block at once (Prefect's thread pool is unbounded): a 1B
model's 16 blocks held ~7.5× its bf16 weights at the peak. The Prefect caller (tasks/stages.py) asks
`max_concurrent_blocks` once per run and model and keeps at most that many block tasks in flight.

One block's peak = its parameters in the compute dtype × the method's factor (the weights, the method's
working copies in fp32, its codes and the dequantized weights it reports errors with) + its statistics
as stored (exact: the refs carry their sizes). SQUEEZEFLOW_MEMORY_LIMIT (e.g. 4GiB) bounds the memory
counted as available, and SQUEEZEFLOW_MAX_BLOCKS caps the result (≥ 1).
"""
from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path

from .errors import BadInput

log = logging.getLogger(__name__)

MAX_BLOCKS_ENV = "SQUEEZEFLOW_MAX_BLOCKS"
LIMIT_ENV = "SQUEEZEFLOW_MEMORY_LIMIT"  # host memory this run may use, as a pod's limit would say
# A per-block method holds the block's weights (compute dtype), an fp32 working copy of the linear it is
# compressing and of its dequantized result, and fp64 copies for the error report: ~4 fp32 copies of the
# largest linear plus the block. 4× the block's bytes covers RTN/GPTQ-style methods; a method may say
# otherwise with a `memory_factor` attribute.
DEFAULT_FACTOR = 4.0
HEADROOM = 0.8  # of the available memory: the allocator's fragmentation, the interpreter, Prefect itself
DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}
COMPUTE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def _cgroup_files():
    """(limit, usage) of this process's cgroup (v2, else v1), or None where there is no limit."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:
            return None
        return int(limit), usage
    return None


def cgroup_limit_bytes() -> int | None:
    """This process's cgroup memory limit (a pod's), or None where there is none."""
    found = _cgroup_files()
    return None if found is None else found[0]


def _cgroup_bytes() -> int | None:
    """Memory left under this process's cgroup limit, or None where there is no limit."""
    found = _cgroup_files()
    return None if found is None else max(0, found[0] - found[1])


def host_available_bytes() -> int:
    """Host memory available now: psutil's (or /proc/meminfo's) MemAvailable, capped by the cgroup limit."""
    try:
        import psutil

        avail = int(psutil.virtual_memory().available)
    except ImportError:
        avail = 0
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    cgroup = _cgroup_bytes()
    avail = avail if cgroup is None else min(avail, cgroup)
    limit = env_limit_bytes()
    if limit is not None:  # what the limit leaves beside this process as it is now
        import psutil

        avail = min(avail, max(0, limit - psutil.Process().memory_info().rss))
    return avail


def env_limit_bytes() -> int | None:
    """SQUEEZEFLOW_MEMORY_LIMIT in bytes, or None when unset; BadInput (one line) when it is not a size."""
    from .shards import parse_size

    raw = os.environ.get(LIMIT_ENV, "").strip()
    if not raw:
        return None
    try:
        return parse_size(raw)
    except BadInput:
        raise BadInput(f"{LIMIT_ENV}={raw!r} is not a size such as 16GiB or 64GB") from None


def available_bytes(device: str = "cpu") -> int:
    """Memory available to block tasks on `device`: the host's, and for cuda[:N] the smaller of the
    host's and the GPU's free memory (a block is read to the host before it moves)."""
    host = host_available_bytes()
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return min(host, int(free))
    return host


def safetensors_header(path: Path) -> dict:
    """A safetensors file's header (tensor names, dtypes, shapes) without reading any tensor."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def block_parameter_counts(model_path: Path) -> dict[int, dict[str, int]]:
    """{block index: {safetensors dtype: parameters}} for every decoder block, from the files' headers."""
    out: dict[int, dict[str, int]] = {}
    for f in sorted(Path(model_path).glob("*.safetensors")):
        for name, info in safetensors_header(f).items():
            if name == "__metadata__" or not name.startswith("model.layers."):
                continue
            block = int(name.split(".")[2])
            n = 1
            for d in info["shape"]:
                n *= d
            out.setdefault(block, {}).setdefault(info["dtype"], 0)
            out[block][info["dtype"]] += n
    return out


def block_peak_bytes(model_path: Path, compute_dtype: str = "fp32", factor: float = DEFAULT_FACTOR,
                     stats_bytes: int = 0) -> int:
    """The largest block's estimated peak while one compress task runs on it."""
    counts = block_parameter_counts(model_path)
    params = max((sum(c.values()) for c in counts.values()), default=0)
    return int(params * COMPUTE_BYTES[compute_dtype] * factor) + stats_bytes


def max_blocks_override() -> int | None:
    raw = os.environ.get(MAX_BLOCKS_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise BadInput(f"{MAX_BLOCKS_ENV}={raw!r}: expected a whole number of blocks ≥ 1")
    return int(raw)


def max_concurrent_blocks(model, recipe, stats: dict | None = None, block: int = 0) -> int:
    """How many compress-block tasks of `model` with `recipe` fit in memory at once (≥ 1), per device.
    `stats` are the block's statistics refs ({name: StatsRef}): their stored size is counted exactly."""
    from .compute import stage_compute
    from .methods import get_method

    compute = stage_compute(model)
    factor = float(getattr(get_method(recipe.methods[0]), "memory_factor", DEFAULT_FACTOR))
    stats_bytes = sum(s.blocks[block].size for s in (stats or {}).values() if block < len(s.blocks))
    peak = max(1, block_peak_bytes(Path(model.path), compute.dtype, factor, stats_bytes))
    avail = available_bytes(compute.device)
    fits = max(1, int(avail * HEADROOM // peak))
    override = max_blocks_override()
    n = min(fits, override) if override is not None else fits
    log.info("compress fan-out: at most %d block(s) at once (one block ~%.1f MiB peak, %.1f MiB available on %s)",
             n, peak / 2**20, avail / 2**20, compute.device)
    return n
