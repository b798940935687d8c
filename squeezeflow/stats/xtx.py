"""Full XᵀX per linear: mean over calibration tokens of x xᵀ, x the linear's input (GPTQ's Hessian).

Linears that read the very same tensor (q/k/v read the input_layernorm output, gate/up the
post_attention_layernorm output) share one accumulator: a d × d fp64 sum is the largest thing a block
holds, so computing it once per distinct input saves both memory and the dominant matmul. Sharing is
detected at run time, not from names: within one forward of the block, a linear whose input is the same
live tensor (same storage, shape, strides and version) as an earlier linear's joins that linear's group.

The stored result still has one entry per linear (consumers look statistics up by linear name), so
members of a group get their own copy of the group's matrix; the metadata's "shared" alias map says
which linear each one was computed for.
"""
from __future__ import annotations

import contextlib
import json
from typing import Iterator

import torch

from ..models import decoder_linears
from ..moe import ExpertMLP, routed_token_counts


def _same_input(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when two tensors hold the same data: identical view of the same storage, not modified since."""
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
                      and a.dtype == b.dtype and a._version == b._version)


class XtX:
    name = "xtx"
    version = "3"  # 2: per-batch fp32 products, fp64 sums; 3: fp64 products again (GPTQ quality)

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        self.dtype = dtype  # accumulation precision (compute.py's statistics dtype; fp64 by default, see below)
        self._sums: dict[str, torch.Tensor] = {}     # group leader -> fp64 sum of x xᵀ
        self._count: dict[str, int] = {}            # group leader -> tokens accumulated
        self._leader: dict[str, str] = {}           # linear -> the linear whose accumulator it shares
        # Inputs seen in the current forward of the block, with the linear that first saw each. Holding
        # the tensors keeps their memory from being reused, so a matching data_ptr means the same data.
        self._live: list[tuple[torch.Tensor, str]] = []
        self._routed: dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def attach(self, layer: torch.nn.Module) -> Iterator[None]:
        self._sums, self._count, self._leader, self._live = {}, {}, {}, []

        def new_forward(_mod, _args) -> None:
            self._live = []

        # An expert's call is a forward of its own (moe.py calls experts after the block's pass): nothing
        # before it shares its input, and forgetting earlier inputs bounds what `_live` holds.
        handles = [m.register_forward_pre_hook(new_forward) for m in (layer, *(
            m for m in layer.modules() if isinstance(m, ExpertMLP)))]
        for name, lin in decoder_linears(layer).items():
            def hook(_mod, args, name=name) -> None:
                x = args[0].detach()
                leader = next((who for t, who in self._live if _same_input(t, x)), None)
                if leader is None:
                    self._live.append((x, name))
                    self._accumulate(name, x)
                    leader = name
                # Grouping must be the same in every forward, or the per-group counts would be wrong.
                if self._leader.setdefault(name, leader) != leader:
                    raise RuntimeError(f"xtx: {name} shared its input with {self._leader[name]} in one forward "
                                       f"and with {leader} in another")
            handles.append(lin.register_forward_pre_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self._live = []
        self._routed = routed_token_counts(layer)  # an MoE block's per-expert counts (moe.py's fallback rule)

    def _accumulate(self, name: str, x: torch.Tensor) -> None:
        # Products in fp64. Measured: fp32 per-batch products (2048 tokens) summed in fp64 raised GPTQ W3
        # g64 perplexity on SmolLM2-135M from 48.15 to 52.82 (SOTU) and 139.9 to 151.0 (Moby Dick): the
        # massive-activation channels make XᵀX span ~9 orders of magnitude, and the inverse Hessian
        # GPTQ propagates errors with is sensitive to the small entries fp32 rounds away.
        x = x.reshape(-1, x.shape[-1]).to(self.dtype)
        if name not in self._sums:  # on the device the block runs on
            self._sums[name] = torch.zeros(x.shape[1], x.shape[1], dtype=self.dtype, device=x.device)
            self._count[name] = 0
        self._sums[name].addmm_(x.T, x)
        self._count[name] += x.shape[0]

    def result(self) -> dict[str, torch.Tensor]:
        """The means (fp32, host), once: the sums are consumed, so the fp64 [d, d] accumulators (an 8B
        down_proj's is 1.6 GiB) are gone before the solver's copies of the same size arrive."""
        means = {}
        while self._sums:
            leader, s = self._sums.popitem()
            means[leader] = s.div_(self._count[leader]).float().cpu()   # in place: the values of `s / count`
            del s
        return {**{name: means[leader] if name == leader else means[leader].clone()
                   for name, leader in sorted(self._leader.items())}, **self._routed}

    def metadata(self) -> dict[str, str]:
        """{"shared": JSON {linear: linear whose input it shares}} for the linears that share one."""
        return {"shared": json.dumps({n: l for n, l in sorted(self._leader.items()) if n != l}, sort_keys=True)}
