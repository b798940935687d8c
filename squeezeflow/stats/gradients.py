"""Per-linear weight gradients of the next-token loss (GWQ's saliency), one decoder block in memory.

For each calibration window b (batch 1), L_b = mean next-token cross-entropy over the window (every
token labelled, the Hugging Face `labels=input_ids` loss) and g_b = ∂L_b/∂W for every linear weight W
of every decoder block. Stored per block, fp32, accumulated in fp64:
  "<linear>.abs_sum" = |Σ_b g_b|      (GWQ's default saliency)
  "<linear>.sq_sum"  = Σ_b g_b²       (the empirical-Fisher option)

Gradients need a forward and a backward through the whole model, which a forward hook cannot give, so
this is not a hook collector. It keeps the streaming rule instead (one block materialized at a time):
  1. forward block by block without autograd, keeping every block's input hidden states on CPU;
  2. at the head, the gradient of each window's loss w.r.t. the final hidden states;
  3. blocks in reverse: materialize block i, recompute its forward from its stored input with autograd
     on, backpropagate the upstream gradient of its output, take the gradients of its linear weights
     (accumulated over windows) and of its input (the upstream gradient for block i - 1), free it.
Memory beyond one block: every block's inputs (n_windows × seqlen × hidden × layers floats, ~0.3 GB for
SmolLM2 at 8 × 512) and one block's fp64 accumulators. Compute: one forward plus one forward+backward.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..calibration import CalibrationSet
from ..errors import BadInput
from ..models import LayerStream, decoder_linears
from ..store import ArtifactStore, Ref
from . import StatsRef, stats_key

NAME = "gradients"
VERSION = "1"


def gradients_key(model_fingerprint: str, calib_sha256: str, n_windows: int) -> str:
    return stats_key(NAME, model_fingerprint, calib_sha256, version=VERSION, params={"n_windows": n_windows})


def collect_gradients(store: ArtifactStore, model_path: Path | str, model_fingerprint: str, calib_ref: Ref,
                      n_windows: int = 8, trust_remote_code: bool = False, batch_size: int = 4) -> StatsRef:
    """Gradient statistics over the first min(n_windows, available) calibration windows, memoized.

    The cache key holds the number of windows actually used, so asking for more windows than the
    calibration set has gives (and reuses) the all-windows result.
    """
    if n_windows < 1:
        raise BadInput(f"gradients need n_windows >= 1 (got {n_windows})")
    windows = CalibrationSet.get(store, calib_ref).windows
    windows = windows[:min(n_windows, len(windows))]
    key = gradients_key(model_fingerprint, calib_ref.sha256, len(windows))
    cached = store.get_index(key)
    if cached is not None:
        return StatsRef(**store.get_json(cached))

    stream = LayerStream(Path(model_path), trust_remote_code)
    stream.model.eval()  # no dropout: gradients must be deterministic
    with torch.no_grad():
        hidden = stream.embed(windows)
        inputs: list[list[torch.Tensor]] = []
        for i in range(stream.num_layers):
            inputs.append(hidden)
            with stream.block(i) as layer:
                hidden = stream.forward_block(layer, hidden, batch_size)
    upstream = [_head_gradient(stream, h, w) for h, w in zip(hidden, windows)]

    blocks: list[Ref] = []
    meta = {"n_windows": str(len(windows)), "loss": "mean next-token cross-entropy per window"}
    for i in reversed(range(stream.num_layers)):
        with stream.block(i) as layer:
            # Block 0's input is the embedding output: its gradient is not needed.
            tensors, upstream = _block_gradients(stream, layer, inputs.pop(), upstream, want_input_grad=i > 0)
        blocks.append(store.put_tensors(tensors, kind=f"stats/{NAME}", metadata=meta))
    ref = StatsRef(collector=NAME, key=key, blocks=blocks[::-1])
    store.put_index(key, store.put_json(ref.model_dump(), kind="stats-index"))
    return ref


def _head_gradient(stream: LayerStream, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """∂L/∂(final hidden states) for one window, L its mean next-token cross-entropy."""
    h = hidden.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = stream.head(h)
        loss = F.cross_entropy(logits[0, :-1], ids[1:].long())
        (grad,) = torch.autograd.grad(loss, h)
    return grad


def _block_gradients(stream: LayerStream, layer: torch.nn.Module, inputs: list[torch.Tensor],
                     upstream: list[torch.Tensor], want_input_grad: bool
                     ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Backpropagate each window's upstream gradient through one block; weight-gradient statistics plus
    the gradients w.r.t. the block's inputs (empty unless `want_input_grad`)."""
    linears = decoder_linears(layer)
    # Only the linear weights need gradients; norms and biases are left out of the graph's leaves.
    for p in layer.parameters():
        p.requires_grad_(False)
    weights = [lin.weight.requires_grad_(True) for lin in linears.values()]
    # Accumulated where the block runs (a GPU's gradients would otherwise cross to the host every window).
    signed = {n: _zeros64(lin.weight) for n, lin in linears.items()}
    squared = {n: _zeros64(lin.weight) for n, lin in linears.items()}
    input_grads: list[torch.Tensor] = []
    with torch.enable_grad():
        for x, grad_out in zip(inputs, upstream):
            x = x.detach().requires_grad_(want_input_grad)
            y = layer(x, **stream.block_kwargs(x, layer))
            y = y[0] if isinstance(y, tuple) else y
            # An expert no token of this window was routed to is not in the graph: its gradient is zero.
            grads = torch.autograd.grad(y, weights + ([x] if want_input_grad else []), grad_outputs=grad_out,
                                        allow_unused=True, materialize_grads=True)
            for name, g in zip(linears, grads):
                g = g.double()
                signed[name] += g
                squared[name] += g * g
            if want_input_grad:
                input_grads.append(grads[-1])
    tensors: dict[str, torch.Tensor] = {}
    for name in linears:
        tensors[f"{name}.abs_sum"] = signed[name].abs().float().cpu()
        tensors[f"{name}.sq_sum"] = squared[name].float().cpu()
    return tensors, input_grads


def _zeros64(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros(like.shape, dtype=torch.float64, device=like.device)
