"""Seeded randomness without global state: a method that seeds torch's generator (TRSP's gates, QUAD's
PEFT, BackSlash) runs under `isolated_rng`, so what it draws is the same as before and the caller's
global generator comes back untouched afterwards."""
from __future__ import annotations

import functools

import torch


def isolated_rng(fn):
    """Decorator: run `fn` on a forked copy of torch's global generators (CPU and any CUDA device)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
            return fn(*args, **kwargs)

    return run
