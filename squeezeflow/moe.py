"""Mixture-of-experts blocks as plain linears: every routed expert its own gate/up/down `nn.Linear`.

transformers 5 keeps a block's routed experts fused in two 3-D parameters (`experts.gate_up_proj` [E, 2I, H],
`experts.down_proj` [E, H, I]); every method here works on `nn.Linear` ("tensors in, tensors out" per linear).
`unfuse_experts(model)` replaces each fused experts module with `UnfusedExperts`, whose children are named
`{e}.gate_proj`, `{e}.up_proj`, `{e}.down_proj` (the linear names read like the Hub checkpoints':
`mlp.experts.3.gate_proj`) and whose forward computes what the fused module's eager forward computes from
the same routing inputs (hidden_states, top_k_index, top_k_weights). LayerStream's skeleton and the packed
loader (hf_integration) both unfuse before anything else touches the experts.

Full precision by rule: the router (`mlp.gate`, a parameter of a router module, or a Linear in other
families) and Qwen2-MoE's `mlp.shared_expert_gate` (a Linear with one output) are never compressed:
routing decisions are discrete, a small error in them sends tokens to other experts, and they are a
negligible share of the weights. `compressed(name)` is that exclusion; the shared expert is compressed.

Statistics per expert come from the tokens routed to it: hooks on an expert's linears see only those.
An expert that receives fewer than MIN_ROUTED_TOKENS calibration tokens in a block's pass has statistics
from too few tokens to mean anything (none at all for an expert nothing is routed to), so its statistics
are instead collected as if every token entering the MoE block were routed to it (a dense pass through that
expert), and the block's statistics say so (`routed_tokens`, see `fallbacks`). To apply the rule, which
depends on counts known only after the pass, an observed pass (`routed_statistics`) computes the block
output without firing the expert linears' hooks, records each batch's MoE input and routing, and at the
end calls each expert, in expert order, on its routed tokens or, under the rule, on all of them. Cost of an
observed pass: the MoE inputs of all windows held once more (the size of the block's hidden states) and the
routed experts run twice. Weight gradients (stats/gradients.py, a backward pass, not hooks) of an expert no
token was routed to are zero: it had no effect on the loss.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F

MIN_ROUTED_TOKENS = 8
FALLBACK_RULE = (f"an expert routed fewer than {MIN_ROUTED_TOKENS} calibration tokens in a block's pass gets "
                 "statistics from every token entering its MoE block (a dense pass through that expert)")
# Linears kept in full precision (module names inside a decoder block end with these): see the docstring.
FULL_PRECISION = ("mlp.gate", "mlp.shared_expert_gate")
ROUTED_TOKENS = "routed_tokens"   # suffix of the per-experts-module count a statistic carries


def compressed(name: str) -> bool:
    """Whether the linear `name` (relative to its decoder block) is one the methods compress."""
    return not any(name == p or name.endswith("." + p) for p in FULL_PRECISION)


class ExpertMLP(nn.Module):
    """One routed expert: down(act(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int, act_fn, dtype=None, device=None):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False, dtype=dtype, device=device)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False, dtype=dtype, device=device)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False, dtype=dtype, device=device)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    def silent(self, x: torch.Tensor) -> torch.Tensor:
        """The same output without running the linears' hooks (see routed_statistics)."""
        return F.linear(self.act_fn(F.linear(x, self.gate_proj.weight)) * F.linear(x, self.up_proj.weight),
                        self.down_proj.weight)


class UnfusedExperts(nn.ModuleList):
    """A fused experts module's computation, one ExpertMLP per expert (children "0", "1", ...)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, act_fn, dtype=None, device=None):
        super().__init__([ExpertMLP(hidden, intermediate, act_fn, dtype, device) for _ in range(num_experts)])
        self.num_experts = num_experts
        self._record: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.routed_tokens: torch.Tensor | None = None   # per expert, of the last observed pass

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        # The fused modules' eager loop (Qwen2MoeExperts / Qwen3MoeExperts / MixtralExperts): same token order,
        # same weighting, same accumulation, so the streamed forward matches theirs.
        final = torch.zeros_like(hidden_states)
        recording = self._record is not None
        if recording:
            self._record.append((hidden_states.detach(), top_k_index.detach()))
        with torch.no_grad():
            mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit[:, 0].tolist():
            if e == self.num_experts:  # the fused modules' "no expert" slot
                continue
            pos, tok = torch.where(mask[e])
            expert = self[e]
            y = expert.silent(hidden_states[tok]) if recording else expert(hidden_states[tok])
            final.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(final.dtype))
        return final

    def observed(self) -> bool:
        """Whether hooks watch any expert linear (a statistics pass is running)."""
        return any(m._forward_pre_hooks or m._forward_hooks for m in self.modules() if isinstance(m, nn.Linear))

    def flush(self, min_tokens: int = MIN_ROUTED_TOKENS) -> None:
        """Call every expert on what its statistics are defined on: its routed tokens, or all tokens that
        entered the block when fewer than `min_tokens` were routed to it. Experts in order, batches in order."""
        record, self._record = self._record or [], None
        counts = torch.zeros(self.num_experts + 1, dtype=torch.int64)
        for _, index in record:
            counts += torch.bincount(index.reshape(-1).cpu(), minlength=self.num_experts + 1)
        self.routed_tokens = counts[:self.num_experts].clone()
        with torch.no_grad():
            for e in range(self.num_experts):
                dense = int(counts[e]) < min_tokens
                for x, index in record:
                    rows = x if dense else x[(index == e).any(dim=-1)]
                    if rows.shape[0]:
                        self[e](rows)


def _fused_shapes(module: nn.Module) -> tuple[int, int, int] | None:
    """(experts, hidden, intermediate) of a transformers-5 fused experts module we can unfuse exactly, else None:
    exactly the two 3-D parameters, no biases, not transposed, and the (hidden, top_k_index, top_k_weights) call."""
    params = dict(module.named_parameters(recurse=False))
    if set(params) != {"gate_up_proj", "down_proj"} or not hasattr(module, "act_fn"):
        return None
    if {n for n, _ in module.named_children()} - {"act_fn"} or any(p is not None for p in (
            getattr(module, "gate_up_proj_bias", None), getattr(module, "down_proj_bias", None))):
        return None
    # transformers' experts-implementation flags: a gated, concatenated, untransposed, bias-free layout only.
    if (getattr(module, "has_bias", False) or getattr(module, "is_transposed", False)
            or getattr(module, "has_post_expert_norm", False) or not getattr(module, "has_gate", True)
            or not getattr(module, "is_concatenated", True)):
        return None
    gate_up, down = params["gate_up_proj"], params["down_proj"]
    if gate_up.dim() != 3 or down.dim() != 3:
        return None
    e, hidden, inter = down.shape
    if tuple(gate_up.shape) != (e, 2 * inter, hidden) or getattr(module, "num_experts", e) != e:
        return None
    if list(inspect.signature(module.forward).parameters)[:3] != ["hidden_states", "top_k_index", "top_k_weights"]:
        return None
    return e, hidden, inter


def unfuse_experts(model: nn.Module) -> int:
    """Replace every fused experts module of `model` by an UnfusedExperts on the same device and dtype (copying
    the weights unless they are on the meta device); returns how many were replaced."""
    todo = [(name, m, shapes) for name, m in model.named_modules() if (shapes := _fused_shapes(m))]
    for name, fused, (e, hidden, inter) in todo:
        ref = fused.gate_up_proj
        new = UnfusedExperts(e, hidden, inter, fused.act_fn, dtype=ref.dtype, device=ref.device)
        if ref.device.type != "meta":
            with torch.no_grad():
                for i, expert in enumerate(new):
                    expert.gate_proj.weight.copy_(fused.gate_up_proj[i, :inter])
                    expert.up_proj.weight.copy_(fused.gate_up_proj[i, inter:])
                    expert.down_proj.weight.copy_(fused.down_proj[i])
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return len(todo)


@contextlib.contextmanager
def routed_statistics(layer: nn.Module, min_tokens: int = MIN_ROUTED_TOKENS) -> Iterator[None]:
    """Around every batch of one pass of a decoder block over all calibration windows: when hooks watch the
    block's expert linears, they see each expert's routed tokens (or all tokens, under the fallback rule) once
    the pass is over. Without hooks nothing changes."""
    watched = [m for m in layer.modules() if isinstance(m, UnfusedExperts) and m.observed()]
    for m in watched:
        m._record = []
    try:
        yield
    except BaseException:
        for m in watched:
            m._record = None
        raise
    for m in watched:
        m.flush(min_tokens)


def routed_token_counts(layer: nn.Module) -> dict[str, torch.Tensor]:
    """{"<experts module>.routed_tokens": tokens routed to each expert} of the block's last observed pass:
    what a statistic carries so that the compress stage can record which experts fell back."""
    return {f"{name}.{ROUTED_TOKENS}": m.routed_tokens.clone() for name, m in layer.named_modules()
            if isinstance(m, UnfusedExperts) and m.routed_tokens is not None}


def fallbacks(block_stats: dict[str, dict[str, torch.Tensor]], min_tokens: int = MIN_ROUTED_TOKENS) -> list[dict]:
    """[{"experts": module, "expert": e, "routed_tokens": n}] for the experts of one block whose statistics
    came from the dense fallback (n < min_tokens), from whichever statistic carries the counts."""
    out = {}
    for tensors in block_stats.values():
        for key, counts in tensors.items():
            if key.endswith("." + ROUTED_TOKENS):
                module = key[:-len(ROUTED_TOKENS) - 1]
                for e, n in enumerate(counts.tolist()):
                    if n < min_tokens:
                        out[(module, e)] = {"experts": module, "expert": e, "routed_tokens": int(n)}
    return [out[k] for k in sorted(out)]


def layout(model: nn.Module, config) -> dict | None:
    """The experts part of `models check`'s layout: count, top-k, which layers route, shared experts."""
    layers = model.model.layers
    moe_layers = [i for i, layer in enumerate(layers) if any(isinstance(m, UnfusedExperts) for m in layer.modules())]
    if not moe_layers:
        return None
    first = layers[moe_layers[0]]
    experts = next(m for m in first.modules() if isinstance(m, UnfusedExperts))
    shared = [n for n, _ in first.named_modules() if n.endswith("shared_expert")]
    return {"num_experts": experts.num_experts, "top_k": getattr(config, "num_experts_per_tok", None),
            "moe_layers": moe_layers, "shared_experts": shared,
            "full_precision": [n for n in FULL_PRECISION if _has(first, n)]}


def _has(layer: nn.Module, name: str) -> bool:
    try:
        layer.get_submodule(name)
        return True
    except AttributeError:
        return False
