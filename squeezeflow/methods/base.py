"""The method protocols. A method is one class implementing one of two kinds, plus opt-in capabilities:

- `WeightMethod`: compresses one linear layer at a time into the fields of a packed format
  (kernels/formats.py). Its `schedule` says how the trunk runs it: "per-block" (blocks are independent,
  statistics from the dense model, so the flow fans out one task per block) or "sequential" (block i
  sees activations through the already-compressed blocks 0..i-1, statistics collected on the fly).
- `LayerRemoval`: removes decoder blocks in checkpointed rounds, then writes a shallower checkpoint.
- `TransformsModel` (capability of a weight method): rewrites the dense checkpoint before compression.
- `TunesPacked` (capability of a weight method): tunes the packed checkpoint afterwards.

The trunk (squeezeflow/dag.py) asks `isinstance(method, TransformsModel)`, never probes attributes.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Literal

import torch

from ..errors import BadInput

Schedule = Literal["per-block", "sequential"]


@dataclass
class CompressedLinear:
    """One linear layer in a packed format: `tensors` are the format's fields before bit-packing."""

    format: str                      # a key of kernels.formats.FORMATS
    params: dict                     # JSON-able format parameters (bits, group_size, ...)
    tensors: dict[str, torch.Tensor]
    bias: torch.Tensor | None = None
    metrics: dict = field(default_factory=dict)  # diagnostics for the report (errors, timings excluded)


class WeightMethod(ABC):
    """Compresses linears. Instances may set `schedule` / `statistics` from their config (GWQ's base)."""

    name: ClassVar[str]
    schedule: Schedule = "per-block"
    # Statistics this method reads (stats.COLLECTORS names, "gradients:<n>"). Per-block methods get them
    # from the dense model; sequential ones collect them through the already-compressed blocks.
    statistics: tuple[str, ...] = ()
    # Sequential methods only: statistics taken from the DENSE model before compression starts.
    dense_statistics: tuple[str, ...] = ()

    def __init__(self, config):
        self.config = config

    def resolve(self, model_config):
        """The method config as it will really run on this model (e.g. a size capped by the model's
        dimensions); preflight stores it in the recipe, so the manifest says what was used."""
        return self.config

    def check(self, linear_shapes: dict[str, tuple[int, int]]) -> None:
        """Preflight on {qualified linear name: (out_features, in_features)}; raise BadInput."""

    @abstractmethod
    def compress_linear(self, name: str, weight: torch.Tensor, stats: dict[str, torch.Tensor]) -> CompressedLinear:
        """Compress one weight [out, in]; `stats` holds this linear's statistics by collector name."""

    @abstractmethod
    def dequantize(self, c: CompressedLinear) -> torch.Tensor:
        """The weight the packed layer computes with (fp32), for diagnostics and tests."""


class TransformsModel(ABC):
    """Capability: the method compresses a rewritten copy of the dense checkpoint (QUAD's expanded,
    rotated model; BackSlash's rate-tuned one). `transform_input` names what `transform` receives:
    the pooled residual covariance of the dense model, or the calibration windows."""

    transform_input: ClassVar[Literal["residual_cov", "calibration"]] = "residual_cov"
    # fp32 copies of the whole model `transform` holds at its peak (the memory plan refuses a job whose
    # model does not fit): QUAD's fp32 input and fp64 output are 3; training (BackSlash) adds gradients and
    # AdamW's two moments to the weights, 4.
    whole_model_fp32_copies: ClassVar[float] = 3.0

    @abstractmethod
    def transform(self, src: Path, dst: Path, data: torch.Tensor, device: torch.device | str = "cpu") -> None:
        """Write the transformed dense checkpoint of `src` into `dst`, computing on `device` (the job's)."""

    def refusal(self, model_config) -> str | None:
        """None when `transform` can rewrite this model's block layout, else why not (one line; preflight
        refuses the recipe with it before any work)."""
        return None


class TunesPacked(ABC):
    """Capability: the packed checkpoint is tuned on calibration windows afterwards (QUAD's PEFT)."""

    whole_model_fp32_copies: ClassVar[float] = 4.0  # the model loaded whole in fp32, its gradients, AdamW's moments

    def tunes(self) -> bool:
        """Whether this configuration tunes at all (e.g. QUAD only with peft_steps > 0)."""
        return True

    @abstractmethod
    def tune(self, src: Path, dst: Path, windows: torch.Tensor, device: torch.device | str = "cpu") -> dict:
        """Write a tuned copy of the packed checkpoint `src` into `dst`, training on `device` (the job's);
        returns the training record."""


@dataclass
class RestructureContext:
    """What a layer-removal round may read: the calibration windows and, lazily, block statistics."""

    windows: torch.Tensor                      # [n, seqlen] token ids
    block_io: Callable[[], list[dict]] | None = None  # per block: {cos, influence, norm_in, ...} (floats)
    device: torch.device = torch.device("cpu")  # where rounds that run the model compute (the job's device)


class LayerRemoval(ABC):
    """Removes decoder blocks: state_0 = initial_state(L); state_{k+1} = run_round(src, k, state_k, ctx);
    finish(src, dst, state_n, ctx). Each round is a pure function of the source checkpoint, the
    calibration windows and the previous JSON state, so the trunk stores every round and a killed run
    resumes at the next one with an identical result."""

    name: ClassVar[str]
    # Settings only `finish` reads (TRSP's stage 2): the rounds' cache key ignores them, so ablations that
    # differ only there share the selection rounds.
    finish_only_fields: ClassVar[tuple[str, ...]] = ()
    # fp32 copies of the whole model a round or `finish` holds at its peak (scoring: 1; TRSP's training: 4).
    whole_model_fp32_copies: ClassVar[float] = 1.0

    def __init__(self, config):
        self.config = config

    @abstractmethod
    def check_layers(self, num_layers: int) -> int:
        """Preflight: the number of layers left after this method (BadInput when it cannot run)."""

    def rounds(self, num_layers: int) -> int:
        """How many checkpointed rounds run before `finish` (0: the method is a single step)."""
        return 0

    def initial_state(self, num_layers: int) -> dict:
        return {"num_layers": num_layers, "selected": []}

    def run_round(self, src: Path, k: int, state: dict, ctx: RestructureContext) -> dict:
        """One selection round (only methods whose `rounds` is above 0 define it: SLEB, TRSP)."""
        raise TypeError(f"{self.name} runs in a single step (rounds = 0); the trunk never calls run_round")

    @abstractmethod
    def finish(self, src: Path, dst: Path, state: dict, ctx: RestructureContext) -> dict:
        """Write the pruned checkpoint to `dst`; returns the record for the manifest (removed layers...)."""


def check_group_size(group_size: int | None, linear_shapes: dict[str, tuple[int, int]]) -> None:
    if group_size is None:
        return
    bad = sorted({in_f for _, (_, in_f) in linear_shapes.items() if in_f % group_size})
    if bad:
        raise BadInput(f"group size {group_size} does not divide in_features {', '.join(map(str, bad))} "
                       f"of the targeted linears; choose a divisor (e.g. 64 or 32) or per-channel")
