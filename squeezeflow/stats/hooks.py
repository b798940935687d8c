"""The one piece of plumbing every hook collector shares: see each module's input while a block runs."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch


@contextlib.contextmanager
def on_inputs(modules: dict[str, torch.nn.Module], fn: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Call fn(name, detached first input) before every forward of each named module, while open."""
    handles = [m.register_forward_pre_hook(lambda _m, args, name=name: fn(name, args[0].detach()))
               for name, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
