"""RF8Linear: the "rf8" packed format, 8-bit residual floating point (GG-prior paper, notes §B.5).

A weight is a signed sum of two powers of two (multiplication = two shifts and an add):

    w ≈ sign · (2^e1 + s2 · 2^e2),   e1 = round(log2 |w|),   e2 = round(log2 |w − sign·2^e1|),

with the residual term kept only when e1 − e2 ≤ 4. Log-domain rounding makes |residual| ≤ 0.414·2^e1,
so e1 − e2 ≥ 1: the residual is absent or one of ±2^(e1−d), d ∈ 1..4 (9 states).

No bit layout is published; ours (exactly 8 bits per weight, plus one int8 exponent bias per row):

    code (uint8) = sign << 7 | m,   sign = bit 7 (1 = negative),   m = bits 0..6 ∈ [0, 127]

    m = 0                      zero (code 128 is −0, also zero)
    m = 1 + 9·k + r, m ≤ 127   e1 = bias[row] + k (k = 0..14; k = 14 only with r = 0, i.e. m = 127)
                               r = 0: no residual
                               r = 1..4: residual +2^(e1 − r)
                               r = 5..8: residual −2^(e1 − (r − 4))

so |w| = 2^(bias + k) · (1 + t_r), t_r ∈ {0, +1/2, +1/4, +1/8, +1/16, −1/2, −1/4, −1/8, −1/16}. The encoder
sets bias[row] = (largest e1 of the row) − 13 (`row_exp_bias`), so the row's 14 top binades (k = 0..13)
have all 9 residual states; m = 127 (2^(bias+14)) decodes like the others but is emitted only for weights
above the row's top binade, which a computed bias has only when clamped at 113 (|w| ≥ 2^126.5): the
largest weights of a row keep their residual. Weights whose e1 falls below the bias round to the nearer
of 0 and 2^bias (≤ 2^-13 of the row's largest weight, far under the format's own error).
The semantics waste some codes: the residual states of neighbouring binades overlap
(2^k·(1 − 1/2) = 2^(k−1), 2^k·(1 + 1/2) = 2^(k+1)·(1 − 1/4), ...), so the 126 codes m = 1..126 hold only
100 distinct magnitudes, about 7 per binade {1, 1.0625, 1.125, 1.25, 1.5, 1.75, 1.875}, against e4m3's
8 evenly spaced ones: at the same 8 bits RF8's error is larger than FP8 e4m3's (4.0% vs 2.6% relative
RMS on N(0, 0.02²)); its case is hardware (two shifts and an add per multiply), not accuracy.
Every code decodes exactly in fp32 (a 5-bit significand times a power of two), as long as 2^bias is a
normal fp32 number: the encoder keeps bias in [−126, 113].

Encoder options: `encode(w)` rounds every weight on its own (recipe `rf8`); `encode(w, exp_bias)` uses
biases fixed beforehand, which the GPTQ encoder (recipe `rf8-gptq`, methods/gg/float8.py) needs: it fixes
them from the original weights, then picks codes column by column while compensating each column's error
on the next ones (gptq_core.gptq_elementwise). Updated weights may outgrow the top binade a little; they
round to the nearer of 1.5·2^(bias+13) and the spare 2^(bias+14), and saturate there. Same format, same
loader: only the choice of codes differs.

Stored fields of a module (safetensors ``<module>.<field>``):

* ``codes`` uint8 ``[out, in]``
* ``exp_bias`` int8 ``[out]``
* ``bias`` float32 ``[out]``, only when the layer has a bias.

Cost: 8 + 8 / in bits per weight (8.014 at in = 576). Expected relative RMS error on N(0, 0.02²): ~4%.
"""

from __future__ import annotations


import torch

from .packed_linear import PackedLinear, ParameterlessFormat

FORMAT_NAME = "rf8"
TOP_K = 13                # the largest e1 of a row sits at k = 13 (k = 14 only for the spare m = 127)
BIAS_MIN, BIAS_MAX = -126, 113   # 2^bias normal in fp32, and 2^(bias + 14) · 1.5 inside fp32's range

# Relative residual t_r by residual state r (index 0..8).
_RESIDUAL = torch.tensor([0.0, 0.5, 0.25, 0.125, 0.0625, -0.5, -0.25, -0.125, -0.0625], dtype=torch.float64)


def magnitude_table() -> torch.Tensor:
    """|w| / 2^bias for m = 0..127 (fp64; every entry is exact in fp32)."""
    m = torch.arange(128)
    k, r = (m - 1).clamp(min=0) // 9, (m - 1).clamp(min=0) % 9
    mags = torch.exp2(k.double()) * (1 + _RESIDUAL[r])
    mags[0] = 0.0
    return mags


_MAG = magnitude_table()


def _checked(w: torch.Tensor) -> torch.Tensor:
    if w.dim() != 2:
        raise ValueError(f"rf8 encodes a 2-D weight [out, in], got shape {tuple(w.shape)}")
    x = w.detach().double()
    if not torch.isfinite(x).all():
        raise ValueError("rf8 cannot encode NaN or infinite weights")
    return x


def _leading_exponent(a: torch.Tensor) -> torch.Tensor:
    """e1 = round(log2 a), −1e9 where a = 0 (log2 of zero is −inf; masked out by the callers)."""
    nz = a > 0
    return torch.where(nz, torch.round(torch.log2(torch.where(nz, a, 1.0))), torch.full_like(a, -1e9))


def row_exp_bias(w: torch.Tensor) -> torch.Tensor:
    """The encoder's default exponent bias per row, int8 [out]: (largest e1 of the row) − 13."""
    top = _leading_exponent(_checked(w).abs()).amax(1)
    top = torch.where(top < -1e8, torch.zeros_like(top), top)          # all-zero row
    return (top - TOP_K).clamp(BIAS_MIN, BIAS_MAX).to(torch.int8)


def encode(w: torch.Tensor, exp_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RF8 codes uint8 [out, in] and per-row exponent biases int8 [out] for a weight [out, in]. A given
    `exp_bias` [out] is used as is (e.g. fixed from the original weights while GPTQ updates them); weights
    above its top binade then saturate to the nearer of 1.5·2^(bias+13) and 2^(bias+14) (m = 127)."""
    x = _checked(w)
    if exp_bias is None:
        exp_bias = row_exp_bias(x)
    elif tuple(exp_bias.shape) != (x.shape[0],):
        raise ValueError(f"rf8 exp_bias must have shape ({x.shape[0]},), got {tuple(exp_bias.shape)}")
    bias = exp_bias.to(x.device, torch.float64)
    if bias.numel() and (bias.min() < BIAS_MIN or bias.max() > BIAS_MAX):
        raise ValueError(f"rf8 exp_bias must lie in [{BIAS_MIN}, {BIAS_MAX}]")
    a = x.abs()
    nz = a > 0
    e1 = _leading_exponent(a)
    over = nz & (e1 > (bias + TOP_K).unsqueeze(1))   # a given bias, or one clamped at BIAS_MAX
    e1 = torch.minimum(e1, (bias + TOP_K).unsqueeze(1))
    k = e1 - bias.unsqueeze(1)
    under = nz & (k < 0)
    res = a - torch.exp2(e1)
    rnz = res != 0
    e2 = torch.where(rnz, torch.round(torch.log2(torch.where(rnz, res.abs(), 1.0))), torch.full_like(a, -1e9))
    d = e1 - e2                                    # ≥ 1 where the residual is nonzero
    keep = rnz & (d <= 4) & (d >= 1)
    r = torch.where(keep, torch.where(res > 0, d, d + 4), torch.zeros_like(d))
    m = 1 + 9 * k + r
    # Below the row's range: nearest of 0 and 2^bias.
    m = torch.where(under, torch.where(a > torch.exp2(bias - 1).unsqueeze(1), 1.0, 0.0), m)
    # Above it (|w| ≥ 2^(bias+13.5)): the largest magnitudes are 1.5·2^(bias+13) (k = 13, r = 1) and the
    # spare 2^(bias+14) (m = 127); the midpoint between them decides, larger weights saturate.
    top = torch.where(a > 1.75 * torch.exp2(bias + TOP_K).unsqueeze(1), 127.0, 1.0 + 9 * TOP_K + 1)
    m = torch.where(over, top, m)
    m = torch.where(nz, m, torch.zeros_like(m))
    codes = m.to(torch.int64) | ((x < 0).to(torch.int64) << 7)
    return codes.to(torch.uint8), bias.to(torch.int8)


def decode(codes: torch.Tensor, exp_bias: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weights [out, in] the codes stand for, exact in fp32 (then cast to `dtype`)."""
    c = codes.to(torch.int64)
    mag = _MAG.to(device=codes.device, dtype=torch.float32)[c & 127]
    sign = 1.0 - 2.0 * (c >> 7).to(torch.float32)
    w = torch.ldexp(mag * sign, exp_bias.to(torch.float32).unsqueeze(1))
    return w.to(dtype)


class RF8Linear(ParameterlessFormat, PackedLinear):
    """Linear layer whose weight is stored as RF8 codes (8 bits) plus an int8 exponent bias per row."""

    format_name = FORMAT_NAME
    vllm = ("not-served", "RF8 is a native 8-bit code with no vLLM kernel or compressed-tensors form; dequantize "
            "to a dense checkpoint first")
    packed_fields = ("codes", "exp_bias")

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, dtype)
        self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.uint8, device=device))
        self.register_buffer("exp_bias", torch.zeros(out_features, dtype=torch.int8, device=device))
        self._register_bias(bias, device)

    @staticmethod
    def pack_fields(codes: torch.Tensor, exp_bias: torch.Tensor, bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if codes.dim() != 2 or codes.dtype != torch.uint8:
            raise ValueError(f"rf8 codes must be uint8 [out, in], got {codes.dtype} {tuple(codes.shape)}")
        if tuple(exp_bias.shape) != (codes.shape[0],):
            raise ValueError(f"rf8 exp_bias must have shape ({codes.shape[0]},), got {tuple(exp_bias.shape)}")
        eb = exp_bias.to(torch.int64)
        if eb.numel() and (eb.min() < BIAS_MIN or eb.max() > BIAS_MAX):
            raise ValueError(f"rf8 exp_bias must lie in [{BIAS_MIN}, {BIAS_MAX}]")
        fields = {"codes": codes.contiguous(), "exp_bias": exp_bias.to(torch.int8).contiguous()}
        if bias is not None:
            if tuple(bias.shape) != (codes.shape[0],):
                raise ValueError(f"bias must have shape ({codes.shape[0]},), got {tuple(bias.shape)}")
            fields["bias"] = bias.detach().to(torch.float32).contiguous()
        return fields

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return decode(self.codes, self.exp_bias, dtype or self.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, format=rf8"
