"""Typed specifications: what a user asks for. Flow parameters use these, so the Prefect UI renders a
typed form, and every invalid value is refused here, before any heavy work.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import BadInput


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelRef(Spec):
    """Which model to compress: a prepared short name (`smollm2-135m`), a local HF directory, a registry
    alias (`model/recipe@alias`) or an s3:// URI."""

    ref: str = "smollm2-135m"
    trust_remote_code: bool = Field(False, description="Run model code from the checkpoint (off unless you trust it)")


class CalibrationSpec(Spec):
    """Calibration windows: `n_samples` random windows of `seqlen` tokens drawn with `seed`."""

    source: str = Field("sotu-calib", description="Named split, local .txt/.jsonl file or dir, or s3:// prefix")
    n_samples: int = Field(128, ge=1, le=100_000)
    seqlen: int = Field(512, ge=16)
    seed: int = 0


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
    block_size: int = Field(128, ge=1, description="Columns per lazy-update block")
    sym: bool = Field(False, description="Symmetric grid (zero point fixed at 2^(bits-1))")
    mse_clip: bool = Field(False, description="Search a per-group clipping of the min/max range")


MethodConfig = Annotated[Union[RTNConfig, GPTQConfig], Field(discriminator="method")]


class Recipe(Spec):
    """An ordered list of methods (structural ones first) under one name."""

    name: str
    methods: list[MethodConfig] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9._:-]*", v):
            raise ValueError(f"recipe name {v!r} must be lowercase letters, digits, '.', '_', ':' or '-'")
        return v


_INT_PRESET = re.compile(r"(rtn|gptq)-w(\d+)(?:g(\d+|c))?(-act)?")
_INT_CONFIGS = {"rtn": RTNConfig, "gptq": GPTQConfig}


def preset(name: str) -> Recipe:
    """Named presets: `<rtn|gptq>-w<bits>g<group>` (e.g. rtn-w4g64, gptq-w3g64), `...gc` or no group for
    per-channel, and `gptq-...-act` for GPTQ with act-order."""
    if (m := _INT_PRESET.fullmatch(name)) and not (m.group(1) == "rtn" and m.group(4)):
        method, bits, group = m.group(1), int(m.group(2)), m.group(3)
        kwargs = {"bits": bits, "group_size": None if group in (None, "c") else int(group)}
        if m.group(4):
            kwargs["act_order"] = True
        return Recipe(name=name, methods=[_INT_CONFIGS[method](**kwargs)])
    raise BadInput(f"unknown recipe {name!r}: use a preset such as rtn-w4g64, rtn-w3g64, gptq-w3g64, "
                   "gptq-w4g64-act, rtn-w8gc, or a YAML file")


def load_recipe(spec: str) -> Recipe:
    """A preset name or a YAML file: {name: ..., methods: [{method: rtn, bits: 4, group_size: 64}]}."""
    try:
        if spec.endswith((".yaml", ".yml")):
            import yaml

            path = Path(spec)
            if not path.is_file():
                raise BadInput(f"recipe file {spec!r} does not exist")
            data = yaml.safe_load(path.read_text())
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
