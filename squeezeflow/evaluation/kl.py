"""Distribution-level fidelity of a compressed model: KL(base ‖ model) and top-1 agreement.

Perplexity only looks at the probability of the one observed token; KL compares whole next-token
distributions, so it sees damage that happens to cancel out in perplexity. Both models read the same
windows, one batch at a time, and only that batch's logits are alive at once (vocab 49,152 makes the
logits of a whole evaluation set several GB).

Positions: a window of L tokens contributes its first L - 1 positions, the ones that have a next
token inside the window, the same positions perplexity scores.
"""
from __future__ import annotations

import torch

# Positions converted to fp64 at a time: ~5 fp64 tensors of 32 x V live at once (log_p, log_q, the
# product's temporaries): 160 MB for a 128k vocabulary.
_CHUNK_POSITIONS = 32


def kl_terms(p_logits: torch.Tensor, q_logits: torch.Tensor) -> tuple[float, int, int]:
    """(Σ KL(P ‖ Q), top-1 agreements, positions) over logits [..., V] of the same positions."""
    p_flat = p_logits.reshape(-1, p_logits.shape[-1])
    q_flat = q_logits.reshape(-1, q_logits.shape[-1]).to(p_flat.device)
    kl_sum, agree = 0.0, 0
    for c in range(0, p_flat.shape[0], _CHUNK_POSITIONS):
        log_p = torch.log_softmax(p_flat[c:c + _CHUNK_POSITIONS].double(), dim=-1)
        log_q = torch.log_softmax(q_flat[c:c + _CHUNK_POSITIONS].double(), dim=-1)
        kl_sum += float((log_p.exp() * (log_p - log_q)).sum())
        agree += int((log_p.argmax(-1) == log_q.argmax(-1)).sum())
    return kl_sum, agree, p_flat.shape[0]


def _device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def kl_and_agreement(model: torch.nn.Module, base_model: torch.nn.Module, windows: torch.Tensor,
                     batch_size: int = 2) -> dict:
    """Mean KL(P_base ‖ Q_model) in nats and top-1 agreement over every next-token position.

    KL(P ‖ Q) = Σ_v P(v) (log P(v) − log Q(v)) with the base model as the reference P: it weighs the
    error by where the base model puts its mass, the usual direction for judging a compressed copy.
    Computed in fp64 from log_softmax so that identical models give exactly 0.
    """
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [k, L] with L >= 2, got shape {tuple(windows.shape)}")
    kl_sum = 0.0
    agree = 0
    positions = 0
    for s in range(0, windows.shape[0], batch_size):
        ids = windows[s:s + batch_size].long()
        p_logits = base_model(input_ids=ids.to(_device(base_model)), use_cache=False).logits[:, :-1]
        q_logits = model(input_ids=ids.to(_device(model)), use_cache=False).logits[:, :-1]
        k, a, n = kl_terms(p_logits, q_logits)
        kl_sum, agree, positions = kl_sum + k, agree + a, positions + n
        del p_logits, q_logits
    return {"kl": kl_sum / positions, "top1_agreement": agree / positions, "positions": positions,
            "direction": "KL(base || model), nats, fp64"}
