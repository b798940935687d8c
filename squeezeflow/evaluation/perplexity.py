"""Perplexity: exp(mean next-token NLL) over non-overlapping windows (the GPTQ convention).

Each window is scored on its own (no BOS is added, no context carried over), so a window of L tokens
contributes L - 1 predictions.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4,
               on_windows: Callable[[int], None] | None = None) -> dict:
    """`on_windows(n)`, if given, is called after each batch with the number of windows scored so far."""
    nll, count = 0.0, 0
    for s in range(0, windows.shape[0], batch_size):
        ids = windows[s:s + batch_size]
        logits = model(input_ids=ids, use_cache=False).logits.float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        nll += float(loss)
        count += ids[:, 1:].numel()
        if on_windows is not None:
            on_windows(s + ids.shape[0])
    return {"perplexity": math.exp(nll / count), "nll_sum": nll, "predicted_tokens": count}
