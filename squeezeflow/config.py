"""Typed specifications shared by every stage: what a user asks for. Flow parameters use these, so the
Prefect UI renders a typed form, and every invalid value is refused here, before any heavy work. Method
configs live beside their methods (squeezeflow/methods), recipes in squeezeflow/recipes.py.
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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

    splits: tuple[str, ...] = Field(("sotu-2000-2021", "moby-dick"), min_length=1, title="Evaluation sources",
                                    description="Held-out texts, as calibration sources: named splits, local "
                                                ".txt/.jsonl files or directories, s3:// prefixes")
    seqlen: int = Field(512, ge=16)
    max_windows: int | None = Field(16, ge=1)
    kl_windows: int = Field(4, ge=0, description="Windows per split for KL and top-1 agreement vs the base model")
    cloze_items: int = Field(0, ge=0, description="Items per cloze task (next sentence, last word); 0 = skip")
    cloze_split: str = "sotu-2000-2021"
    seed: int = 0


class ComputeSpec(Spec):
    """Where and in which precision the stages compute. `device`: auto (one GPU when present, else CPU;
    SQUEEZEFLOW_DEVICE sets what auto means on a machine), cpu, cuda (every visible GPU: block tasks and a
    sequential method's calibration forward spread over them) or cuda:N (that GPU alone). `dtype`: the precision
    blocks are loaded and run in (fp32 = what the checkpoint's weights give, today's default).
    `stats_dtype`: the precision statistics accumulate in (fp64: XᵀX in fp32 measurably hurts GPTQ W3)."""

    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:[0-9]{1,3})?)$",
                        description="auto (one GPU when present), cpu, cuda (every visible GPU) or "
                                    "cuda:N (that GPU)")
    dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Precision blocks are loaded and run in")
    stats_dtype: Literal["fp64", "fp32"] = Field("fp64", description="Precision statistics accumulate in")

    def key_form(self) -> dict:
        """What changes results: the kind of device (cpu / cuda, not which one) and the precisions."""
        return {"device": self.device.split(":")[0], "dtype": self.dtype, "stats_dtype": self.stats_dtype}


def one_line(e: ValidationError) -> str:
    """Pydantic's errors as one readable line: `field: message; field: message`."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)
