"""A sequential method's calibration forward split across devices (`--device cuda` with several GPUs).

The windows are cut into contiguous shards at batch boundaries, one per device, in a fixed order: a batch
holds the same windows as on one device, so every window's hidden state is computed exactly as there, and
the shards are concatenated back in window order. Each device holds a copy of the current block (the
primary's tensors, copied) and its own statistics collectors; the collectors' sums are then added in
device order on the primary device.

That last sum is the one place the device count shows: a sum over shards is not bitwise the running sum one
device makes (fp64 addition is not associative). The stored statistics are fp32 means of those fp64 sums,
so a difference (~1e-16 relative) reaches them only where it straddles an fp32 rounding boundary; the test
(tests/unit/test_sequential_devices.py) shows ["cpu", "cpu"] packs the same bytes as ["cpu"] on the tiny
model and bounds the fp64 sums' difference.

Only collectors that keep per-linear `_sums` / `_count` dicts (xtx, hdiag, residual_cov) can be merged
(block_io's single count cannot); an MoE block
decides its experts' fallback on the whole pass (moe.routed_statistics), so both run on one device.

Activations live where placement.py says, per device: on it, or in (pinned) host memory moved one batch
at a time.
"""
from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import torch

from .. import moe
from ..models import LayerStream, decoder_linears

MERGEABLE = ("_sums", "_count")


def shards(n_windows: int, n_devices: int, batch_size: int) -> list[range]:
    """Contiguous window ranges, one per device (fewer when there are fewer batches), cut at batch
    boundaries so every batch is the one a single device would run; earlier shards take the extra batch."""
    batches = -(-n_windows // batch_size)
    n = max(1, min(n_devices, batches))
    sizes = [batches // n + (1 if k < batches % n else 0) for k in range(n)]
    out, start = [], 0
    for size in sizes:
        out.append(range(start * batch_size, min(n_windows, (start + size) * batch_size)))
        start += size
    return out


def splittable(model: torch.nn.Module, collectors: list) -> bool:
    """Whether a model's statistics passes may be split: no routed experts in any block (a model may start
    with dense blocks), only mergeable collectors."""
    if any(isinstance(m, moe.ExpertMLP) for m in model.modules()):
        return False
    return all(all(isinstance(getattr(c, a, None), dict) for a in MERGEABLE) for c in collectors)


def merge(parts: list) -> object:
    """The first collector with every other's sums and counts added to it, in the order given, on its device."""
    first = parts[0]
    for other in parts[1:]:
        for name, s in other._sums.items():
            if name in first._sums:
                target = first._sums[name]
                first._sums[name] = target + s.to(target.device)
            else:
                first._sums[name] = s
            first._count[name] = first._count.get(name, 0) + other._count[name]
        if hasattr(first, "_leader"):  # xtx: which linears shared an input (the same in every forward)
            for name, leader in other._leader.items():
                if first._leader.setdefault(name, leader) != leader:
                    raise RuntimeError(f"xtx: {name} grouped differently on two devices")
    return first


def forward_windows(stream: LayerStream, layer: torch.nn.Module, hidden: list[torch.Tensor], device: torch.device,
                    batch_size: int, pin: bool) -> list[torch.Tensor]:
    """LayerStream.forward_block for hidden states kept elsewhere than `device` (host memory): each batch is
    moved to the device, its outputs back to where the inputs were. Same batches, same results."""
    out: list[torch.Tensor] = []
    home = hidden[0].device if hidden else device
    with moe.routed_statistics(layer):
        for s in range(0, len(hidden), batch_size):
            h = torch.cat(hidden[s:s + batch_size]).to(device, non_blocking=True)
            y = layer(h, **stream.block_kwargs(h, layer))
            y = y[0] if isinstance(y, tuple) else y
            y = y.to(home)
            out.extend((y.pin_memory() if pin else y).split(1))
    return out


@dataclass
class Shard:
    stream: LayerStream      # on this shard's device: its own skeleton, masks and rotary tables
    hidden: list[torch.Tensor]
    on_device: bool          # hidden on stream.device, else in host memory
    pin: bool


class Split:
    """The windows' hidden states as shards over devices; `shards[0]` is on the primary stream's device."""

    def __init__(self, parts: list[Shard], batch_size: int = 4):
        self.parts, self.batch_size = parts, batch_size

    def hidden(self) -> torch.Tensor:
        """Every window's hidden state, in window order, on the host (the checkpoint's form)."""
        # Each shard to the host first: a cat over tensors on different GPUs is refused.
        return torch.cat([torch.cat(p.hidden).cpu() for p in self.parts if p.hidden])

    @contextlib.contextmanager
    def block(self, i: int, layer: torch.nn.Module) -> Iterator[list[torch.nn.Module]]:
        """Block i on every device: the primary's `layer` and a copy of its tensors on each other stream."""
        layers = [layer]
        try:
            for p in self.parts[1:]:
                copy = p.stream.inner.layers[i]
                state = {k: v.to(p.stream.device) for k, v in layer.state_dict().items()}
                copy.load_state_dict(state, assign=True, strict=True)
                layers.append(copy)
            yield layers
        finally:
            for copy in layers[1:]:
                copy.to_empty(device="meta")

    def _forward(self, k: int, layer: torch.nn.Module) -> list[torch.Tensor]:
        p = self.parts[k]
        if p.on_device:
            return p.stream.forward_block(layer, p.hidden, self.batch_size)
        return forward_windows(p.stream, layer, p.hidden, p.stream.device, self.batch_size, p.pin)

    def _each(self, fn) -> list:
        if len(self.parts) == 1:
            return [fn(0)]
        with ThreadPoolExecutor(len(self.parts)) as pool:  # devices run at once; results in device order
            return list(pool.map(fn, range(len(self.parts))))

    def collect(self, layers: list[torch.nn.Module], make_collectors) -> list:
        """Run the block over every shard with fresh collectors attached; the collectors merged in device order."""
        def run(k: int) -> list:
            collectors = make_collectors()
            with contextlib.ExitStack() as attached:
                for c in collectors:
                    attached.enter_context(c.attach(layers[k]))
                self._forward(k, layers[k])
            return collectors

        per_device = self._each(run)
        return [merge([d[j] for d in per_device]) for j in range(len(per_device[0]))]

    def forward(self, layers: list[torch.nn.Module]) -> None:
        """Every shard through its device's copy of the block (the outputs replace the shard's inputs)."""
        outs = self._each(lambda k: self._forward(k, layers[k]))
        for p, out in zip(self.parts, outs):
            p.hidden = out

    @staticmethod
    def set_weight(layers: list[torch.nn.Module], linear: str, w_hat: torch.Tensor) -> None:
        """The compressed weight of one linear into the block on every device."""
        for layer in layers:
            decoder_linears(layer)[linear].weight.copy_(w_hat)
