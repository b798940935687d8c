"""BackSlash (arXiv 2504.16968): rate-constrained tuning, then RTN and exp-Golomb storage.

transform (the flow's transform stage, on calibration windows): minimise

    J(θ) = LM loss + λ · mean_i (|θ_i| + ε)^ν

over the weights of every decoder linear (the ones that are quantized and entropy coded; embeddings
and norms stay frozen), with ν re-estimated at every step by the moment-matching GGD fit of those
weights pooled (gg/ggd.py). The rate term goes through the optimizer with the loss (the paper's
formulation; the released reproduction applies a decoupled step with ε = 1 instead, see notes §B.2).
AdamW without weight decay, `steps` steps of one window of `seqlen` tokens, windows cycled in a seeded
order. λ = 0 has no rate term, so nothing is tuned: the checkpoint is copied byte for byte (an exact
no-op, tested); a loss-only fine-tune is a different experiment.

compress: RTN (bits, group or per channel) of the tuned weights, stored as exp-Golomb coded codes
("eg" format around "intq"), so one recipe `backslash-l<λ>-w<bits>[g<group>|gc][-s<steps>]` runs
tune → quantize → exp-Golomb.
"""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from ...config import Spec
from ...rng import isolated_rng
from ..base import CompressedLinear, TransformsModel, WeightMethod
from ..intq.rtn import RTNConfig, preset_group_size
from ..registry import register
from .entropy_coded import EGConfig, EntropyCoded
from .ggd import shape_from_rho


class BackSlashConfig(Spec):
    """BackSlash: rate-constrained tuning, loss + λ·mean((|θ| + ε)^ν) over the decoder linears' weights with ν
    re-estimated by a GGD fit at every step (AdamW on calibration windows), then RTN and exp-Golomb storage.
    λ = 0 is an exact no-op (the tuned checkpoint is the input)."""

    method: Literal["backslash"] = "backslash"
    lam: float = Field(0.0, ge=0.0, description="Lagrange multiplier λ of the rate term")
    eps: float = Field(1e-3, gt=0.0, le=1.0, description="ε in (|θ| + ε)^ν (soft gradient clipping)")
    steps: int = Field(20, ge=1, le=100_000, description="Optimizer steps")
    lr: float = Field(1e-5, gt=0.0, le=1.0, description="AdamW learning rate (no weight decay)")
    windows: int = Field(16, ge=1, le=100_000, description="Calibration windows used for training (cycled)")
    seqlen: int = Field(256, ge=8, description="Tokens per training window (calibration windows are cut)")
    bits: int = Field(8, ge=2, le=8, description="RTN bits after tuning")
    group_size: int | None = Field(None, description="RTN group size; None = per output channel")
    chunk: int = Field(4096, ge=1, le=2**20, description="Exp-Golomb codewords per sync offset")
    seed: int = 0


_PRESET = re.compile(r"backslash-l(\d+(?:\.\d+)?(?:e\d+)?)-w(\d)(?:g(\d+|c))?(?:-s(\d+))?"
                     r"(?:-lr(\d+(?:\.\d+)?(?:e-?\d+)?))?")


def parse_preset(name: str) -> list | None:
    """`backslash-l<λ>-w<bits>[g<group>|gc][-s<steps>][-lr<lr>]`: tune, then RTN + exp-Golomb; λ = 0: no
    tuning."""
    if not (m := _PRESET.fullmatch(name)):
        return None
    kwargs = {"lam": float(m.group(1)), "bits": int(m.group(2)), "group_size": preset_group_size(m.group(3))}
    if m.group(4):
        kwargs["steps"] = int(m.group(4))
    if m.group(5):
        kwargs["lr"] = float(m.group(5))
    return [BackSlashConfig(**kwargs)]


def pooled_shape(weights: list[torch.Tensor]) -> float:
    """GGD shape ν of all the weights pooled, from fp64 moment sums (no concatenation). The sums are
    accumulated where the weights are, in the same order as Python floats would be (the same bits), and
    read once: not one device sync per weight per step."""
    n, s1, s2 = 0, 0.0, 0.0
    with torch.no_grad():
        for w in weights:
            n += w.numel()
            s1 = s1 + w.detach().abs().sum(dtype=torch.float64)
            s2 = s2 + w.detach().pow(2).sum(dtype=torch.float64)
    s1, s2 = float(s1), float(s2)
    return shape_from_rho(n * s2 / (s1 * s1))


def rate(weights: list[torch.Tensor], nu: float, eps: float) -> torch.Tensor:
    """mean over all weights of (|θ| + ε)^ν, differentiable."""
    n = sum(w.numel() for w in weights)
    return sum(((w.abs() + eps) ** nu).sum() for w in weights) / n


@isolated_rng
def tune_checkpoint(src: Path, dst: Path, windows: torch.Tensor, cfg: BackSlashConfig,
                    device: torch.device | str = "cpu") -> dict:
    """Write the BackSlash-tuned dense checkpoint of `src` into `dst`, training in fp32 on `device` (the
    job's; fp32 whatever its dtype: AdamW steps of lr 1e-5 vanish in bf16); returns the training record."""
    from ...models import decoder_linears, load_model

    dst.mkdir(parents=True, exist_ok=True)
    if cfg.lam == 0:
        for f in sorted(Path(src).iterdir()):
            if f.is_file():
                shutil.copyfile(f, dst / f.name)
        return {"steps": 0, "note": "lambda = 0: no rate term, checkpoint copied unchanged"}
    torch.manual_seed(cfg.seed)
    model = load_model(Path(src), torch.float32).to(device)
    model.requires_grad_(False)
    weights = []
    for layer in model.model.layers:
        for lin in decoder_linears(layer).values():
            lin.weight.requires_grad_(True)
            weights.append(lin.weight)
    data = windows[: cfg.windows, : cfg.seqlen]
    # A host generator draws on the host (it cannot draw on a device): the same window order everywhere.
    order = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(cfg.seed), device="cpu")
    opt = torch.optim.AdamW(weights, lr=cfg.lr, weight_decay=0.0)
    log = []
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        ids = data[order[step % data.shape[0]]].unsqueeze(0).to(device)
        nu = pooled_shape(weights)
        out = model(input_ids=ids, labels=ids)
        r = rate(weights, nu, cfg.eps)
        loss = out.loss + cfg.lam * r
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.append({"step": step, "lm_loss": round(out.loss.item(), 6), "rate": round(r.item(), 8),
                    "nu": round(nu, 4)})
    seconds = time.perf_counter() - t0
    model.requires_grad_(False)
    model.to("cpu")   # written from host memory (a no-op on CPU)
    model.save_pretrained(dst, safe_serialization=True)
    for f in sorted(Path(src).iterdir()):
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config", "chat_template")):
            shutil.copyfile(f, dst / f.name)
    record = {"steps": cfg.steps, "seconds": round(seconds, 2),
              "seconds_per_step": round(seconds / cfg.steps, 3), "nu_final": round(pooled_shape(weights), 4),
              "log": log}
    (dst / "backslash.json").write_text(json.dumps(record, sort_keys=True, indent=1))
    return record


@register(BackSlashConfig, presets=parse_preset, examples=("backslash-l1000-w8gc-s20",))
class BackSlash(WeightMethod, TransformsModel):
    transform_input = "calibration"     # the transform stage hands over the calibration windows
    whole_model_fp32_copies = 4.0       # it trains the whole model: weights, gradients, AdamW's two moments
    config: BackSlashConfig

    def __init__(self, config: BackSlashConfig):
        super().__init__(config)
        self.coder = EntropyCoded(EGConfig(base=RTNConfig(bits=config.bits, group_size=config.group_size),
                                           chunk=config.chunk))

    def check(self, linear_shapes):
        self.coder.check(linear_shapes)

    def transform(self, src: Path, dst: Path, windows: torch.Tensor, device: torch.device | str = "cpu") -> None:
        tune_checkpoint(src, dst, windows, self.config, device)

    def compress_linear(self, name, weight, stats) -> CompressedLinear:
        return self.coder.compress_linear(name, weight, stats)

    def dequantize(self, c):
        return self.coder.dequantize(c)
