"""Perplexity: exp(mean next-token NLL) over non-overlapping windows (the GPTQ convention).

Each window is scored on its own (no BOS is added, no context carried over), so a window of L tokens
contributes L - 1 predictions.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4) -> dict:
    nll, count = 0.0, 0
    for s in range(0, windows.shape[0], batch_size):
        ids = windows[s:s + batch_size]
        logits = model(input_ids=ids, use_cache=False).logits.float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        nll += float(loss)
        count += ids[:, 1:].numel()
    return {"perplexity": math.exp(nll / count), "nll_sum": nll, "predicted_tokens": count}
