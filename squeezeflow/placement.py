"""Where a sequential method's calibration activations live between blocks: on the compute device when they
fit beside the block's working set, else in (pinned) host memory, moved to the device one batch at a time.

GPTQ keeps every calibration window's hidden state [1, T, d] from one block to the next. On a GPU that is
the fastest place for them, but n_samples × T × d in the compute dtype can outgrow the device beside the
block, its XᵀX and the solver's copies. The decision compares, per device:

    2 × activations (a block's inputs and outputs are both alive while it runs) + the solve's peak
    against the device's free memory × HEADROOM

where the solve's peak is memory_plan's compress-stage estimate without its activations (one block × the
method's working copies, its XᵀX, the solver's [in, in] copies). Host placement uses pinned pages when CUDA
is available (host->device copies of pinned memory are asynchronous and twice as fast), plain ones
otherwise; on a CPU job the activations are in host memory anyway, so there is nothing to decide.
"""
from __future__ import annotations

from dataclasses import dataclass

HEADROOM = 0.9  # of the device's free memory: the allocator's fragmentation, cuBLAS workspaces


@dataclass(frozen=True)
class Placement:
    on_device: bool       # activations stay on the compute device
    pin: bool             # host placement in pinned memory
    activation_bytes: int
    peak_bytes: int
    free_bytes: int | None  # the device's free memory (None on a CPU device)

    def describe(self, device: str) -> str:
        if self.free_bytes is None:
            return f"calibration activations on {device}"
        where = device if self.on_device else ("pinned host memory" if self.pin else "host memory")
        return (f"calibration activations in {where}: 2 × {self.activation_bytes / 2**20:.1f} MiB + solve peak "
                f"{self.peak_bytes / 2**20:.1f} MiB against {self.free_bytes / 2**20:.1f} MiB free on {device}")


def decide(activation_bytes: int, peak_bytes: int, free_bytes: int | None, cuda_available: bool,
           headroom: float = HEADROOM) -> Placement:
    """The placement for activations of `activation_bytes` on a device with `free_bytes` free (None: the
    device is the host) beside a working set of `peak_bytes`."""
    if free_bytes is None:
        return Placement(True, False, activation_bytes, peak_bytes, None)
    fits = 2 * activation_bytes + peak_bytes <= free_bytes * headroom
    return Placement(fits, not fits and cuda_available, activation_bytes, peak_bytes, free_bytes)


def activation_bytes(windows: int, seqlen: int, hidden: int, element_bytes: int) -> int:
    """Bytes of `windows` hidden states [1, seqlen, hidden] in the compute dtype."""
    return windows * seqlen * hidden * element_bytes


def solve_peak_bytes(model_path, config, compute, method) -> int:
    """memory_plan's compress-stage peak of one block without the activations and the host's fixed overhead:
    what the device holds beside the activations while a block is compressed."""
    from . import memory_plan

    return memory_plan.compress_peak(memory_plan.shapes(model_path, config), method, compute).bytes


def free_bytes(device) -> int | None:
    """Free memory on a CUDA `device`; None for the host (activations are on the host whatever we decide)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def plan(device, windows: int, seqlen: int, hidden: int, element_bytes: int, peak_bytes: int) -> Placement:
    import torch

    return decide(activation_bytes(windows, seqlen, hidden, element_bytes), peak_bytes, free_bytes(device),
                  torch.cuda.is_available())
