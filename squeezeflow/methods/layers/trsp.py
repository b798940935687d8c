"""TRSP: two-stage regularized layer pruning (METHODS.md "TRSP"; research/seeds-quad-ggd-trsp.md §C).

Stage 1 (selection): every decoder block gets a gate, out = x + S_i · (block(x) − x), S_i = 1 at first.
Only the gates train, on LM loss (full next-token labels) + λ1 Σ_{i∉P} |S_i|. Greedy rounds: after each
round the unselected block with the smallest |S_i| joins P and is masked (S = 0, skipped). `iterative =
False` is the one-shot ablation: one round of training, then the p·L smallest |S_i| at once.
Stage 2 (transfer): all gates back to 1 and every block active; the block weights train on LM loss +
λ2 Σ_{i∈P} mean-over-tokens ‖X_out^i − X_in^i‖₂, pushing the selected blocks toward the identity so the
others absorb their function. Then the blocks in P are deleted (layer_idx renumbered) and the model is
saved as a plain, shallower HF checkpoint. No training after removal.

Each round gets a fresh Adam and draws its windows from a generator seeded by (seed, round), so a round
depends only on the previous round's gates and selection: that is what makes per-round resume exact.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from ...rng import isolated_rng
from ..base import RestructureContext
from ..registry import register
from .common import LayerPruneConfig, LayerPruneMethod, calibration_batches, load_dense, parse_layer_preset
from .gates import gate_model, save_pruned


class TRSPConfig(LayerPruneConfig):
    """TRSP: gates on each block's residual contribution, L1-penalised and greedily masked (stage 1), then the
    selected blocks pushed toward identity while the weights train (stage 2), then removal. The step, window
    and sequence-length knobs size the CPU budget."""

    method: Literal["trsp"] = "trsp"
    # λ1: the paper reports 5e-3 (grid-searched on LLaMA2-7B), its released code hard-codes 100; the gates'
    # L1 pull has to match the LM gradient of the model at hand. On SmolLM2-135M, 0.05 and 0.2 select the
    # best set found (SLEB's); 5e-3, 0.02 and 0.5 sets whose removal costs 12-134% more held-out perplexity
    # (benchmarks/README.md, layer pruning).
    lambda1: float = Field(0.05, ge=0.0, description="L1 weight on the gates (stage 1); tune per model family")
    lambda2: float = Field(1e-3, ge=0.0, description="Weight of the transfer penalty (stage 2)")
    iterative: bool = Field(True, description="Greedy rounds (one block per round); False = one-shot selection")
    steps: int = Field(16, ge=1, le=100_000, description="Gate-training steps per round (stage 1)")
    lr: float = Field(0.05, gt=0.0, le=10.0, description="Adam learning rate of the gates (large: in 16 steps a gate must be able to approach 0)")
    stage2_steps: int = Field(32, ge=0, le=100_000, description="Transfer steps (0 = no stage 2)")
    stage2_lr: float = Field(2e-5, gt=0.0, le=1.0, description="AdamW learning rate of the block weights (stage 2)")
    stage2_kept_only: bool = Field(False, description="Stage 2 updates only the kept blocks (and embeddings/norm)")
    windows: int = Field(32, ge=1, le=100_000, description="Calibration windows used for training")
    seqlen: int = Field(128, ge=8, description="Tokens per training window (calibration windows are cut)")
    batch_size: int = Field(4, ge=1, le=1024, description="Windows per step")
    seed: int = 0


def parse_preset(name: str) -> list | None:
    """`trsp-<percent>[-no-iter][-no-stage2]`: the ablations one-shot selection and no transfer stage."""
    if (parsed := parse_layer_preset(name, "trsp")) is None:
        return None
    ratio, flags = parsed
    kwargs = {"ratio": ratio}
    if "-no-iter" in flags:
        kwargs["iterative"] = False
    if "-no-stage2" in flags:
        kwargs["stage2_steps"] = 0
    return [TRSPConfig(**kwargs)]


def lm_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy with every position labelled (not only the last token)."""
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def _generator(seed: int, k: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + k)


def _draw(batches: torch.Tensor, batch_size: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """`batch_size` windows drawn with the host generator (it cannot draw on a device: the same windows on
    every device), indexed on the host and moved to the model's device."""
    idx = torch.randint(len(batches), (batch_size,), generator=gen, device="cpu")
    return batches[idx].to(device)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def train_gates(model: torch.nn.Module, gates, batches: torch.Tensor, steps: int, batch_size: int, lr: float,
                lam1: float, gen: torch.Generator) -> list[float]:
    """Stage-1 training of the unmasked gates (block weights frozen); returns the loss per step."""
    for p in model.parameters():
        p.requires_grad_(False)
    active = [g for g in gates if not g.masked]
    for g in active:
        g.gate.requires_grad_(True)
    opt = torch.optim.Adam([g.gate for g in active], lr=lr)
    losses = []
    device = _device(model)
    for _ in range(steps):
        loss = lm_loss(model, _draw(batches, batch_size, gen, device)) + lam1 * sum(g.gate.abs() for g in active)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def transfer(model: torch.nn.Module, gates, selected: list[int], batches: torch.Tensor, steps: int, batch_size: int,
             lr: float, lam2: float, kept_only: bool, gen: torch.Generator) -> list[float]:
    """Stage 2: selected blocks active, block weights updated on LM loss + λ2 Σ_{i∈P} mean ‖X_out − X_in‖₂."""
    for g in gates:
        g.masked = False
        g.gate.data.fill_(1.0)
        g.gate.requires_grad_(False)
    for i, g in enumerate(gates):
        g.record_transfer = i in selected
    params = []
    for name, p in model.named_parameters():
        in_selected = any(name.startswith(f"model.layers.{i}.") for i in selected)
        train = not name.endswith(".gate") and not (kept_only and in_selected)
        p.requires_grad_(train)
        if train:
            params.append(p)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    device = _device(model)
    for _ in range(steps):
        lm = lm_loss(model, _draw(batches, batch_size, gen, device))
        loss = lm + lam2 * sum(gates[i].transfer_norm for i in selected)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    for g in gates:
        g.record_transfer = False
    return losses


# A chain: remove blocks first, then quantize the shallower model (recipes.preset joins steps with '+').
@register(TRSPConfig, presets=parse_preset, examples=("trsp-25", "trsp-25-no-iter", "trsp-25+gwq-w4g64"))
class TRSP(LayerPruneMethod):
    config: TRSPConfig
    finish_only_fields = ("lambda2", "stage2_steps", "stage2_lr", "stage2_kept_only")  # rounds ignore them
    whole_model_fp32_copies = 4.0  # it trains the whole model: weights, gradients, AdamW's two moments

    def rounds(self, num_layers: int) -> int:
        return self.n_remove(num_layers) if self.config.iterative else 1

    def _model(self, src: Path, state: dict, device: torch.device):
        model = load_dense(src, device)
        gates = gate_model(model)
        for g, value in zip(gates, state.get("gates") or [1.0] * len(gates)):
            g.gate.data.fill_(value)
        for i in state["selected"]:
            gates[i].masked = True
            gates[i].gate.data.fill_(0.0)
        return model, gates

    @isolated_rng
    def run_round(self, src: Path, k: int, state: dict, ctx: RestructureContext) -> dict:
        cfg = self.config
        started = time.perf_counter()
        torch.manual_seed(cfg.seed + k)
        model, gates = self._model(src, state, ctx.device)
        batches = calibration_batches(ctx.windows, cfg.windows, cfg.seqlen)
        # One-shot selection trains as many steps in its single round as the greedy rounds do in all
        # (equal compute), so the ablation isolates the greedy masking.
        steps = cfg.steps if cfg.iterative else cfg.steps * self.n_remove(state["num_layers"])
        losses = train_gates(model, gates, batches, steps, cfg.batch_size, cfg.lr, cfg.lambda1, _generator(cfg.seed, k))
        values = [float(g.gate.detach()) for g in gates]
        unselected = [i for i in range(len(gates)) if i not in state["selected"]]
        # argmin |S_i| among unselected blocks; ties go to the lower index (sorted is stable).
        ranked = sorted(unselected, key=lambda i: abs(values[i]))
        take = 1 if cfg.iterative else self.n_remove(state["num_layers"])
        return {**state, "gates": values, "selected": state["selected"] + ranked[:take],
                "history": state.get("history", []) + [{"round": k, "gates": values, "picked": ranked[:take],
                                                        "loss_first": losses[0] if losses else None,
                                                        "loss_last": losses[-1] if losses else None,
                                                        "seconds": round(time.perf_counter() - started, 2)}]}

    @isolated_rng
    def finish(self, src: Path, dst: Path, state: dict, ctx: RestructureContext) -> dict:
        cfg = self.config
        selected = sorted(state["selected"])
        record = {"removed": selected, "selection_order": state["selected"], "rounds": state.get("history", [])}
        model, gates = self._model(src, {**state, "gates": None, "selected": []}, ctx.device)
        if cfg.stage2_steps > 0:
            started = time.perf_counter()
            torch.manual_seed(cfg.seed + 10_000)
            batches = calibration_batches(ctx.windows, cfg.windows, cfg.seqlen)
            losses = transfer(model, gates, selected, batches, cfg.stage2_steps, cfg.batch_size, cfg.stage2_lr,
                              cfg.lambda2, cfg.stage2_kept_only, _generator(cfg.seed, 10_000))
            record["stage2"] = {"steps": cfg.stage2_steps, "loss_first": losses[0], "loss_last": losses[-1],
                                "seconds": round(time.perf_counter() - started, 2)}
        for p in model.parameters():
            p.requires_grad_(False)
        save_pruned(model, src, dst, selected)
        return record
