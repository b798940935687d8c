"""Typed specifications: what a user asks for. Flow parameters use these, so the Prefect UI renders a
typed form, and every invalid value is refused here, before any heavy work.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import BadInput
from .strict_types import refuse_coercion


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _no_coercion(cls, data):
        """`group_size: true`, `bits: "4"`, `damp: .nan` are refused, not turned into 1, 4 and NaN."""
        return refuse_coercion(cls, data)


class ModelRef(Spec):
    """Which model to compress: a prepared short name (`smollm2-135m`), a local HF directory, a registry
    alias (`model/recipe@alias`) or an s3:// URI."""

    ref: str = Field("smollm2-135m", min_length=1, description="Prepared name (smollm2-135m), local HF directory, "
                     "registry alias model/recipe@alias, or s3:// URI")
    trust_remote_code: bool = Field(False, description="Run model code from the checkpoint (off unless you trust it)")


# Named text splits `squeezeflow data prepare` writes (calibration.SPLITS; a unit test keeps them equal).
NAMED_SPLITS = ("sotu-calib", "sotu-2000-2021", "moby-dick")

# A calibration source as the Prefect UI form shows it: a dropdown of the named splits, or (second tab) any
# local file, directory or s3:// prefix. At runtime both are plain strings: callers pass str as before.
CalibrationSource = Union[
    Annotated[Literal[NAMED_SPLITS], Field(title="Named split")],
    Annotated[str, Field(title="File, directory or s3:// prefix", min_length=1)],
]


class CalibrationSpec(Spec):
    """Calibration windows: `n_samples` random windows of `seqlen` tokens drawn with `seed`."""

    source: CalibrationSource = Field("sotu-calib", description="Named split, local .txt/.jsonl file or dir, or s3:// prefix")
    n_samples: int = Field(128, ge=1, le=100_000, description="Calibration windows drawn from the source")
    seqlen: int = Field(512, ge=16, description="Tokens per calibration window")
    seed: int = Field(0, description="Seed of the window sampling (same seed, same windows)")


class EvalSpec(Spec):
    """Perplexity protocol: non-overlapping `seqlen` windows of each held-out split; at most
    `max_windows` of them, evenly spaced over the text (None = all). KL and top-1 agreement against the
    base model use the first `kl_windows` of them; cloze tasks are built from `cloze_split` with `seed`."""

    splits: tuple[str, ...] = ("sotu-2000-2021", "moby-dick")
    seqlen: int = Field(512, ge=16)
    max_windows: int | None = Field(16, ge=1)
    kl_windows: int = Field(4, ge=0, description="Windows per split for KL and top-1 agreement vs the base model")
    cloze_items: int = Field(0, ge=0, description="Items per cloze task (next sentence, last word); 0 = skip")
    cloze_split: str = "sotu-2000-2021"
    seed: int = 0


class IntGridConfig(Spec):
    """Group-wise integer grid shared by RTN and GPTQ (packed as the `intq` format)."""

    bits: int = Field(4, description="Bits per weight, 2..8")
    group_size: int | None = Field(64, description="Inputs per group; None = one group per output channel")

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if not 2 <= v <= 8:
            raise ValueError(f"bits must be between 2 and 8, got {v}")
        return v

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"group_size must be positive or null (per-channel), got {v}")
        return v


class RTNConfig(IntGridConfig):
    """Round-to-nearest, group-wise asymmetric min-max."""

    method: Literal["rtn"] = "rtn"


class GPTQConfig(IntGridConfig):
    """GPTQ: sequential, block by block, second-order error compensation with XᵀX of each linear's
    inputs as seen through the already-quantized blocks."""

    method: Literal["gptq"] = "gptq"
    damp: float = Field(0.01, gt=0, le=1, description="Dampening, as a fraction of mean diag(XᵀX)")
    act_order: bool = Field(False, description="Quantize columns in order of decreasing XᵀX diagonal")
    static_groups: bool = Field(False, description="Fit every group's grid on the original weights up front "
                                "(llm-compressor's way) instead of on the error-updated ones when reached")
    block_size: int = Field(128, ge=1, description="Columns per lazy-update block")
    sym: bool = Field(False, description="Symmetric grid (zero point fixed at 2^(bits-1))")
    mse_clip: bool = Field(False, description="Search a per-group clipping of the min/max range")
    # Left out of dumps (and so of cache keys) while unset, so adding it kept every older key valid.
    clip_norm: float | None = Field(None, ge=1.0, le=4.0, exclude_if=lambda v: v is None,
                                    description="Exponent p of the clip search's error Σ|w - q|^p (mse_clip); "
                                    "unset = 2 (squared error). The -mse presets use 2.4, as the GPTQ reference "
                                    "code and llm-compressor's MSE observer do")


class GWQConfig(IntGridConfig):
    """GWQ: the top `outlier_frac` most salient weights of each matrix stay fp16 (sparse, CSR), the rest
    is group-wise integer (RTN, or GPTQ treating the outliers as exact). Saliency from the gradients of
    the next-token loss on `n_grad` calibration windows (abs_grad = |Σg|), or an ablation score."""

    method: Literal["gwq"] = "gwq"
    outlier_frac: float = Field(0.01, ge=0.0, le=0.5, description="Fraction of each matrix kept in fp16")
    score: Literal["abs_grad", "taylor", "fisher", "hessian", "magnitude", "random"] = Field(
        "abs_grad", description="Outlier selection: |Σg|, |Σg·w|, Σg², w²·h, |w|, or random (seeded)")
    n_grad: int = Field(8, ge=1, le=4096, description="Calibration windows for the gradients")
    base: Literal["rtn", "gptq"] = Field("rtn", description="Quantizer for the non-outliers")
    damp: float = Field(0.01, gt=0, le=1, description="GPTQ dampening (base=gptq)")
    seed: int = Field(0, description="Seed of the random selection (score=random)")


class PruneConfig(Spec):
    """Weight pruning: `sparsity` is the fraction of weights REMOVED from each matrix (unstructured), or
    `n_m` = (N, M) keeps N of every M consecutive inputs of a row (semi-structured, e.g. 2:4)."""

    sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="Fraction of weights removed (unstructured)")
    n_m: tuple[int, int] | None = Field(None, description="Keep N of every M consecutive inputs, e.g. [2, 4]")

    @field_validator("n_m")
    @classmethod
    def _n_m(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and not (0 < v[0] < v[1] <= 256):
            raise ValueError(f"n_m must be (N, M) with 0 < N < M <= 256, got {list(v)}")
        return v

    @property
    def removed_fraction(self) -> float:
        return 1.0 - self.n_m[0] / self.n_m[1] if self.n_m else self.sparsity


class NoWagPConfig(PruneConfig):
    """NoWag-P: prune by the normalized score W̄²·h (column then row normalization, h = E[x²])."""

    method: Literal["nowag-p"] = "nowag-p"


class WandaConfig(PruneConfig):
    """Wanda: prune by |W|·‖X_j‖ compared within each output row (unstructured) or each N:M group."""

    method: Literal["wanda"] = "wanda"


class MagnitudeConfig(PruneConfig):
    """Magnitude pruning: |W| over the whole matrix (unstructured) or each N:M group; no statistics."""

    method: Literal["magnitude"] = "magnitude"


class NoWagVQConfig(Spec):
    """NoWag-VQ: weighted k-means over d-dimensional subvectors of the normalized weight, one codebook of
    K = 2^(bits·d) centroids per matrix, importance h_j = E[x_j²] as the per-coordinate weight."""

    method: Literal["nowag-vq"] = "nowag-vq"
    bits: int = Field(2, ge=1, le=4, description="Bits per weight of the codes: K = 2^(bits*d)")
    d: int = Field(6, ge=1, le=16, description="Subvector length (consecutive inputs of a row)")
    max_iter: int = Field(100, ge=1, le=1000, description="Lloyd iterations at most (stops early when stable)")
    init: Literal["kmeans++", "kmeans++-clip"] = Field("kmeans++", description="Seeding: D² sampling, or the original code's clipped variant")
    seed: int = 0

    @field_validator("d")
    @classmethod
    def _codebook_size(cls, d: int, info) -> int:
        bits = info.data.get("bits", 2)
        if bits * d > 16:
            raise ValueError(f"bits*d = {bits * d} > 16: a codebook of 2^{bits * d} centroids is too large (K <= 65536)")
        return d


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


class LayerPruneConfig(Spec):
    """Structural layer removal: floor(ratio · L) decoder blocks are deleted (25% of 30 = 7), no retraining
    after removal. Runs before any weight method of the recipe."""

    ratio: float = Field(0.25, gt=0.0, lt=1.0, description="Fraction of decoder blocks removed (rounded down)")


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


class ShortGPTConfig(LayerPruneConfig):
    """ShortGPT: remove the blocks with the lowest block influence 1 − cos(x_in, x_out)."""

    method: Literal["shortgpt"] = "shortgpt"


class SLEBConfig(LayerPruneConfig):
    """SLEB-style: greedily remove the block whose removal raises calibration perplexity least."""

    method: Literal["sleb"] = "sleb"
    windows: int = Field(4, ge=1, le=100_000, description="Calibration windows scored per candidate")
    seqlen: int = Field(128, ge=8, description="Tokens per scored window")


class LastLayersConfig(LayerPruneConfig):
    """Remove the blocks just before the final one."""

    method: Literal["lastlayers"] = "lastlayers"


class Float8Config(Spec):
    """Encoder options shared by the 8-bit float formats. Unset fields are left out of dumps (and so of
    cache keys): the plain rf8 / fp8-e4m3 recipes keep their keys."""

    gptq: bool | None = Field(None, exclude_if=lambda v: v is None,
                              description="Choose the codes GPTQ's way: column by column, each rounding error "
                              "compensated on the later columns through XᵀX (sequential, like gptq); unset = "
                              "round every weight on its own. Same packed format either way")
    damp: float | None = Field(None, gt=0, le=1, exclude_if=lambda v: v is None,
                               description="GPTQ dampening, as a fraction of mean diag(XᵀX); unset = 0.01")
    act_order: bool | None = Field(None, exclude_if=lambda v: v is None,
                                   description="GPTQ: process columns by decreasing XᵀX diagonal; unset = off")

    @model_validator(mode="after")
    def _gptq_options(self):
        if not self.gptq and (self.damp is not None or self.act_order is not None):
            raise ValueError("damp and act_order are options of the GPTQ encoder: set gptq: true too")
        return self


class RF8Config(Float8Config):
    """RF8: every weight as sign · (2^e1 + s2 · 2^e2) in exactly 8 bits, plus an int8 exponent bias per row
    (kernels/rf8_linear.py); no statistics unless gptq is set."""

    method: Literal["rf8"] = "rf8"


class FP8Config(Float8Config):
    """FP8 e4m3 (torch.float8_e4m3fn) weights with an fp16 scale per output row; no statistics unless gptq
    is set."""

    method: Literal["fp8"] = "fp8"


class EGConfig(Spec):
    """Exp-Golomb (k = 0) storage of a base method's integer codes, ranked by frequency per layer
    (kernels/eg_linear.py); the base method runs unchanged."""

    method: Literal["eg"] = "eg"
    base: Annotated[Union[RTNConfig, GPTQConfig, RF8Config], Field(discriminator="method")]
    chunk: int = Field(4096, ge=1, le=2**20, description="Codewords between two sync offsets of the stream")


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


MethodConfig = Annotated[Union[RTNConfig, GPTQConfig, GWQConfig, NoWagPConfig, WandaConfig, MagnitudeConfig, NoWagVQConfig,
                           QUADConfig, TRSPConfig, ShortGPTConfig, SLEBConfig, LastLayersConfig,
                           RF8Config, FP8Config, EGConfig, BackSlashConfig],
                         Field(discriminator="method")]


class Recipe(Spec):
    """An ordered list of methods (structural ones first) under one name."""

    name: str
    methods: list[MethodConfig] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9._:+-]*", v):  # '+' joins chained presets
            raise ValueError(f"recipe name {v!r} must be lowercase letters, digits, '.', '_', ':', '+' or '-'")
        return v


_INT_PRESET = re.compile(r"(rtn|gptq)-w(\d+)(?:g(\d+|c))?(-act)?(-static)?(-mse)?")
_INT_CONFIGS = {"rtn": RTNConfig, "gptq": GPTQConfig}
_GWQ_PRESET = re.compile(r"gwq-w(\d+)(?:g(\d+|c))?(-gptq)?(?:-(abs_grad|taylor|fisher|hessian|magnitude|random))?"
                         r"(?:-n(\d+))?(?:-o(\d+(?:\.\d+)?))?")
_PRUNE_PRESET = re.compile(r"(nowag-p|wanda|magnitude)(?:-p)?(?:(\d{1,2})|(\d+):(\d+))")
_PRUNE_CONFIGS = {"nowag-p": NoWagPConfig, "wanda": WandaConfig, "magnitude": MagnitudeConfig}
_QUAD_PRESET = re.compile(r"(quad|quarot)-w(\d)a(4|6|8|16)(a8)?(?:-r(\d+))?(-peft(\d+)?)?")
_VQ_PRESET = re.compile(r"nowag-vq(\d)(?:d(\d+))?")
_LAYER_PRESET = re.compile(r"(trsp|shortgpt|sleb|lastlayers)-(\d{1,2})((?:-no-iter|-no-stage2)*)")
_LAYER_CONFIGS = {"trsp": TRSPConfig, "shortgpt": ShortGPTConfig, "sleb": SLEBConfig, "lastlayers": LastLayersConfig}
_FLOAT8_PRESETS = {"rf8": RF8Config(), "fp8-e4m3": FP8Config(),
                   "rf8-gptq": RF8Config(gptq=True), "fp8-e4m3-gptq": FP8Config(gptq=True)}
_BACKSLASH_PRESET = re.compile(r"backslash-l(\d+(?:\.\d+)?(?:e\d+)?)-w(\d)(?:g(\d+|c))?(?:-s(\d+))?"
                               r"(?:-lr(\d+(?:\.\d+)?(?:e-?\d+)?))?")
# Subvector length by bits when a VQ preset does not name one: K = 4096 centroids (12-bit indices).
_VQ_DEFAULT_D = {1: 12, 2: 6, 3: 4, 4: 3}
PRESET_EXAMPLES = ("rtn-w4g64", "rtn-w3g64", "gptq-w3g64", "gptq-w4g64-act", "rtn-w8gc", "gwq-w3g64", "gwq-w3g64-gptq",
                   "gwq-w3g64-fisher-n32-o2", "nowag-p50", "nowag-p2:4",
                   "nowag-p4:8", "wanda-p50", "wanda-p2:4", "magnitude-p50", "nowag-vq2", "nowag-vq3",
                   "quad-w4a4", "quad-w4a4a8", "quad-w4a4a8-peft", "quarot-w4a4", "quad-w4a4-r16",
                   "trsp-25", "trsp-25-no-iter", "shortgpt-25", "sleb-25", "lastlayers-25", "trsp-25+gwq-w4g64",
                   "rf8", "fp8-e4m3", "rf8-gptq", "fp8-e4m3-gptq", "rtn-w4g64-eg", "rf8-eg", "backslash-l1000-w8gc-s20")

# A recipe as flow parameters take it. The UI form offers PRESET_EXAMPLES in a dropdown (first tab) and a
# free string (second tab) for any other preset of the families above or a recipe YAML path; at runtime
# both are plain strings, and load_recipe() is what validates them.
RecipeSpec = Union[
    Annotated[Literal[PRESET_EXAMPLES], Field(title="Preset")],
    Annotated[str, Field(title="Other preset or recipe YAML path", min_length=1)],
]


def preset(name: str) -> Recipe:
    """Named presets: `<rtn|gptq>-w<bits>g<group>` (e.g. rtn-w4g64, gptq-w3g64), `...gc` or no group for
    per-channel, `gptq-...-act` for GPTQ with act-order and `gptq-...-static` for grids fitted up front, `gptq-...-mse` for a per-group clip search; pruning `<nowag-p|wanda|magnitude>` with
    `p<percent removed>` or `p<N>:<M>` (nowag-p50, wanda-p2:4); `nowag-vq<bits>[d<dim>]` (nowag-vq2 =
    2 bits, d = 6, K = 4096); `gwq-w<bits>g<group>[-gptq][-<score>][-n<grad windows>][-o<outlier %>]`
    (gwq-w3g64 = RTN base, |Σg| saliency on 8 windows, 1% fp16 outliers);
    `<quad|quarot>-w<bits>a<act bits>[a8][-r<outlier dims>][-peft[<steps>]]` (quad-w4a4 = r 64, W4A4;
    quad-w4a4a8 = 8-bit inputs to o_proj/down_proj; -peft = 200 tuning steps; quarot = r 0);
    layer removal `<trsp|shortgpt|sleb|lastlayers>-<percent>` (trsp-25 = 7 of 30 blocks, rounded down;
    trsp ablations `-no-iter`, `-no-stage2`); chains joined by '+', structural first
    (`trsp-25+gwq-w4g64`: remove blocks, then quantize the shallower model);
    8-bit floats `rf8` (residual floating point) and `fp8-e4m3` (per-row scale), `rf8-gptq` / `fp8-e4m3-gptq`
    for the same formats with codes chosen by GPTQ's error compensation; `<rtn|gptq|rf8 preset>-eg`
    stores that preset's codes exp-Golomb coded (rtn-w4g64-eg, rf8-eg); BackSlash
    `backslash-l<λ>-w<bits>[g<group>|gc][-s<steps>][-lr<lr>]` (tune, then RTN + exp-Golomb; λ = 0: no tuning)."""
    if "+" in name:
        parts = name.split("+")
        if not all(parts):
            raise BadInput(f"recipe {name!r}: empty step in a '+' chain")
        return Recipe(name=name, methods=[m for part in parts for m in preset(part).methods])
    if name in _FLOAT8_PRESETS:
        return Recipe(name=name, methods=[_FLOAT8_PRESETS[name]])
    if name.endswith("-eg"):
        base = preset(name[:-3]).methods
        if len(base) != 1 or base[0].method not in ("rtn", "gptq", "rf8"):
            raise BadInput(f"recipe {name!r}: exp-Golomb storage (-eg) wraps rtn, gptq or rf8 codes, not {name[:-3]!r}")
        return Recipe(name=name, methods=[EGConfig(base=base[0])])
    if m := _BACKSLASH_PRESET.fullmatch(name):
        kwargs = {"lam": float(m.group(1)), "bits": int(m.group(2)),
                  "group_size": None if m.group(3) in (None, "c") else int(m.group(3))}
        if m.group(4):
            kwargs["steps"] = int(m.group(4))
        if m.group(5):
            kwargs["lr"] = float(m.group(5))
        try:
            return Recipe(name=name, methods=[BackSlashConfig(**kwargs)])
        except ValidationError as e:
            raise BadInput(f"recipe {name!r}: {one_line(e)}") from None
    if (m := _INT_PRESET.fullmatch(name)) and not (m.group(1) == "rtn" and (m.group(4) or m.group(5) or m.group(6))):
        method, bits, group = m.group(1), int(m.group(2)), m.group(3)
        kwargs = {"bits": bits, "group_size": None if group in (None, "c") else int(group)}
        if m.group(4):
            kwargs["act_order"] = True
        if m.group(5):
            kwargs["static_groups"] = True
        if m.group(6):
            kwargs["mse_clip"] = True
            if method == "gptq":
                kwargs["clip_norm"] = 2.4
        return Recipe(name=name, methods=[_INT_CONFIGS[method](**kwargs)])
    try:
        if m := _GWQ_PRESET.fullmatch(name):
            kwargs = {"bits": int(m.group(1)), "group_size": None if m.group(2) in (None, "c") else int(m.group(2)),
                      "base": "gptq" if m.group(3) else "rtn"}
            if m.group(4):
                kwargs["score"] = m.group(4)
            if m.group(5):
                kwargs["n_grad"] = int(m.group(5))
            if m.group(6):
                kwargs["outlier_frac"] = float(m.group(6)) / 100
            return Recipe(name=name, methods=[GWQConfig(**kwargs)])
        if m := _PRUNE_PRESET.fullmatch(name):
            kwargs = {"sparsity": int(m.group(2)) / 100} if m.group(2) else {"n_m": (int(m.group(3)), int(m.group(4)))}
            return Recipe(name=name, methods=[_PRUNE_CONFIGS[m.group(1)](**kwargs)])
        if m := _VQ_PRESET.fullmatch(name):
            bits = int(m.group(1))
            d = int(m.group(2)) if m.group(2) else _VQ_DEFAULT_D.get(bits, 1)
            return Recipe(name=name, methods=[NoWagVQConfig(bits=bits, d=d)])
        if m := _QUAD_PRESET.fullmatch(name):
            kwargs = {"bits": int(m.group(2)), "act_bits": int(m.group(3)), "act8": bool(m.group(4))}
            if m.group(1) == "quarot":
                if m.group(5) and int(m.group(5)):
                    raise BadInput(f"recipe {name!r}: QuaRot has no outlier dimensions (r = 0); use quad-...-r<n>")
                kwargs["r"] = 0
            elif m.group(5):
                kwargs["r"] = int(m.group(5))
            if m.group(6):
                kwargs["peft_steps"] = int(m.group(7) or 200)
            return Recipe(name=name, methods=[QUADConfig(**kwargs)])
        if m := _LAYER_PRESET.fullmatch(name):
            flags = m.group(3) or ""
            if flags and m.group(1) != "trsp":
                raise BadInput(f"recipe {name!r}: -no-iter / -no-stage2 are TRSP ablations")
            kwargs = {"ratio": int(m.group(2)) / 100}
            if "-no-iter" in flags:
                kwargs["iterative"] = False
            if "-no-stage2" in flags:
                kwargs["stage2_steps"] = 0
            return Recipe(name=name, methods=[_LAYER_CONFIGS[m.group(1)](**kwargs)])
    except ValidationError as e:
        raise BadInput(f"recipe {name!r}: {one_line(e)}") from None
    raise BadInput(f"unknown recipe {name!r}: use a preset such as {', '.join(PRESET_EXAMPLES)}, or a YAML file")


def load_recipe(spec: str) -> Recipe:
    """A preset name or a YAML file: {name: ..., methods: [{method: rtn, bits: 4, group_size: 64}]}."""
    try:
        if spec.endswith((".yaml", ".yml")):
            import yaml

            from .yaml_safe import load_yaml_file

            path = Path(spec)
            if not (path.exists() or path.is_symlink()):  # a FIFO or a loop: load_yaml_file names it
                raise BadInput(f"recipe file {spec!r} does not exist")
            try:
                data = load_yaml_file(path, what="recipe file")  # strict: no duplicate keys, aliases, huge files
            except yaml.YAMLError as e:  # one line: where and what, not the parser's multi-line excerpt
                mark = getattr(e, "problem_mark", None)
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                raise BadInput(f"recipe file {spec!r} is not valid YAML{where}: "
                               f"{getattr(e, 'problem', None) or e}") from None
            if not isinstance(data, dict):
                raise BadInput(f"recipe file {spec!r} must hold a mapping with 'name' and 'methods'")
            data.setdefault("name", path.stem.lower())
            return Recipe(**data)
        return preset(spec)
    except ValidationError as e:
        raise BadInput(f"recipe {spec!r}: {one_line(e)}") from None


def one_line(e: ValidationError) -> str:
    """Pydantic's errors as one readable line: `field: message; field: message`."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)
