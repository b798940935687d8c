"""QUAD (and QuaRot, r = 0) as a weight method that transforms the model and tunes the packed one.

The flow first writes the transformed dense checkpoint (transform.py: norms fused, residual stream
expanded by the top-r outlier directions and rotated; function-preserving), then runs this method
sequentially over it like GPTQ: each linear is GPTQ-quantized to a symmetric per-channel int grid with
an MSE clip search, act-order, and
- readers of the residual stream (q, k, v, gate, up; Phi3's fused qkv, gate_up): the r outlier input
  columns are kept in fp16 (`w_outlier`); GPTQ treats them as exact and lets them absorb the
  compensation of the columns before them (keep_absorbs), since their stored value is free;
- o_proj and down_proj: the input is rotated online (seeded Hadamard-based rotation stored with the
  layer, kernels/rotation.py), so the weight is quantized as W·R against the Hessian Rᵀ H R.
The packed "quad" format also records the activation fake-quant each layer runs with: act_bits per
token (4, or 8 into o_proj/down_proj for W4A4/A8), clip 0.9.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from ...config import Spec
from ...errors import BadInput
from ...kernels import rotation
from ..base import CompressedLinear, TransformsModel, TunesPacked, WeightMethod
from ..intq.gptq_core import gptq_quantize
from ..registry import register
from .transform import READERS, WRITERS, layout_refusal, transform_checkpoint


class QUADConfig(Spec):
    """QUAD: the residual stream expanded by the top-r eigenvectors of its covariance (kept fp16 by every
    reader), rotated, GPTQ int weights (symmetric per channel, MSE clip) and per-token activation
    fake-quant; r = 0 is QuaRot. `act8` feeds o_proj and down_proj 8-bit activations (W4A4/A8);
    `peft_steps` > 0 tunes w_outlier and the weight scales on calibration text afterwards."""
    method: Literal["quad"] = "quad"
    r: int = Field(64, ge=0, le=4096, description="Outlier dimensions kept in full precision (capped at hidden/8)")
    bits: int = Field(4, ge=2, le=8, description="Weight bits (symmetric, per output channel)")
    act_bits: Literal[4, 6, 8, 16] = Field(4, description="Activation bits per token (16 = weights only)")
    act8: bool = Field(False, description="8-bit activations into o_proj and down_proj (W4A4/A8)")
    act_clip: float = Field(0.9, gt=0, le=1, description="Activation range clip ratio")
    online_rotation: bool = Field(True, description="Rotate the inputs of o_proj and down_proj online")
    act_order: bool = Field(True, description="GPTQ act-order")
    damp: float = Field(0.01, gt=0, le=1, description="GPTQ dampening, as a fraction of mean diag(XᵀX)")
    peft_steps: int = Field(0, ge=0, le=100_000, description="PEFT steps (0 = no tuning)")
    peft_lr: float = Field(1e-5, gt=0, le=1, description="AdamW learning rate of the PEFT")
    seed: int = Field(0, description="Seed of the rotations and of the PEFT's window order")


_PRESET = re.compile(r"(quad|quarot)-w(\d)a(4|6|8|16)(a8)?(?:-r(\d+))?(-peft(\d+)?)?")


def parse_preset(name: str) -> list | None:
    """`<quad|quarot>-w<bits>a<act bits>[a8][-r<outlier dims>][-peft[<steps>]]`: quad-w4a4 = r 64, W4A4;
    quad-w4a4a8 = 8-bit inputs to o_proj/down_proj; -peft = 200 tuning steps; quarot = r 0."""
    if not (m := _PRESET.fullmatch(name)):
        return None
    kwargs = {"bits": int(m.group(2)), "act_bits": int(m.group(3)), "act8": bool(m.group(4))}
    if m.group(1) == "quarot":
        if m.group(5) and int(m.group(5)):
            raise BadInput(f"recipe {name!r}: QuaRot has no outlier dimensions (r = 0); use quad-...-r<n>")
        kwargs["r"] = 0
    elif m.group(5):
        kwargs["r"] = int(m.group(5))
    if m.group(6):
        kwargs["peft_steps"] = int(m.group(7) or 200)
    return [QUADConfig(**kwargs)]

# Distinct seeds per rotation site (the residual rotations use seed and seed + 1).
_ONLINE_SEED_OFFSET = {"self_attn.o_proj": 2, "mlp.down_proj": 3}


def linear_role(name: str) -> str:
    """'reader' or the writer's short name for a qualified linear name (model.layers.3.mlp.up_proj)."""
    short = ".".join(name.split(".")[-2:])
    if short in READERS:
        return "reader"
    if short in WRITERS:
        return short
    raise BadInput(f"QUAD does not know the role of linear {name!r} (readers: {', '.join(READERS)}; "
                   f"writers: {', '.join(WRITERS)})")


@register(QUADConfig, presets=parse_preset,
          examples=("quad-w4a4", "quad-w4a4a8", "quad-w4a4a8-peft", "quarot-w4a4", "quad-w4a4-r16"))
class QUAD(WeightMethod, TransformsModel, TunesPacked):
    schedule = "sequential"
    statistics = ("xtx",)                  # collected on the transformed model, through quantized blocks
    dense_statistics = ("residual_cov",)   # the pooled covariance that defines the outlier directions
    transform_input = "residual_cov"
    config: QUADConfig

    def resolve(self, model_config) -> QUADConfig:
        """The r really used, recorded in the recipe: capped at hidden_size / 8 (METHODS.md) and rounded to
        the nearest multiple of the attention head count, because transformers refuses a config whose
        hidden size (d + r) is not a multiple of it (SmolLM2, 9 heads: r = 64 becomes 63, 16 becomes 18)."""
        heads = int(model_config.num_attention_heads)
        cap = int(model_config.hidden_size) // 8 // heads * heads
        r = min(cap, heads * round(self.config.r / heads))
        return self.config if r == self.config.r else self.config.model_copy(update={"r": r})

    def refusal(self, model_config) -> str | None:
        return layout_refusal(model_config, self.resolve(model_config).r)

    def transform(self, src: Path, dst: Path, pooled_cov: torch.Tensor, device: torch.device | str = "cpu") -> None:
        transform_checkpoint(src, dst, pooled_cov, self.config.r, self.config.seed, device)

    def tunes(self) -> bool:
        return self.config.peft_steps > 0

    def tune(self, src: Path, dst: Path, windows: torch.Tensor, device: torch.device | str = "cpu") -> dict:
        from .peft import tune_packed

        return tune_packed(src, dst, windows, self.config.peft_steps, self.config.peft_lr, self.config.seed, device)

    def _rotation(self, name: str, in_features: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        role = linear_role(name)
        if role == "reader" or not self.config.online_rotation:
            return None
        A, signs = rotation.random_factors(in_features, self.config.seed + _ONLINE_SEED_OFFSET[role])
        return A.float(), signs.float()   # as stored: the weight is fused with exactly these factors

    def compress_linear(self, name, weight, stats):
        cfg = self.config
        out_f, in_f = weight.shape
        role = linear_role(name)
        r = cfg.r if role == "reader" else 0
        W, H = weight.double(), stats["xtx"].double()
        rot = self._rotation(name, in_f)
        if rot is not None:
            R = rotation.dense(*rot).to(W.device)   # built on the host (seeded factors, cached Hadamard)
            W, H = W @ R, R.T @ H @ R
        keep = None
        if r:
            keep = torch.zeros(out_f, in_f, dtype=torch.bool, device=weight.device)
            keep[:, :r] = True
        res = gptq_quantize(W.float(), H.float(), cfg.bits, None, damp=cfg.damp, act_order=cfg.act_order,
                            keep=keep, sym=True, mse_clip=True, keep_absorbs=True)
        act_bits = 8 if cfg.act8 and role != "reader" else cfg.act_bits
        params = {"bits": cfg.bits, "outlier_cols": r, "act_bits": act_bits, "act_clip": cfg.act_clip,
                  "rotate": rot is not None}
        tensors = {"codes": res.codes[:, r:].contiguous(), "scales": res.scales[:, :1].contiguous(),
                   "w_outlier": res.w_hat[:, :r].half().contiguous()}
        if rot is not None:
            tensors |= {"rot_a": rot[0].to(weight.device), "rot_signs": rot[1].to(weight.device)}
        metrics = {f"gptq_{k}": v for k, v in res.stats.items() if k != "seconds"}
        return CompressedLinear("quad", params, tensors, metrics=metrics)

    def dequantize(self, c: CompressedLinear) -> torch.Tensor:
        """The weight in the dense model's (unrotated) input basis: [w_outlier, (q − 2^(b−1))·s] · Rᵀ."""
        t, bits = c.tensors, c.params["bits"]
        main = (t["codes"].float() - 2 ** (bits - 1)) * t["scales"].float()
        w = torch.cat([t["w_outlier"].float(), main], 1)
        if c.params["rotate"]:
            # rotation.dense builds on the host (its Hadamard is cached there); the product runs where w is.
            R = rotation.dense(t["rot_a"].cpu(), t["rot_signs"].cpu()).to(w.device)
            w = (w.double() @ R.T).float()
        return w
