"""The method interface. A method is one class: it declares the statistics it needs, checks that it
can run on a model before any heavy work, and compresses one linear layer at a time into the fields of
a packed format (see kernels/formats.py).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..errors import BadInput


@dataclass
class CompressedLinear:
    """One linear layer in a packed format: `tensors` are the format's fields before bit-packing."""

    format: str                      # a key of kernels.formats.FORMATS
    params: dict                     # JSON-able format parameters (bits, group_size, ...)
    tensors: dict[str, torch.Tensor]
    bias: torch.Tensor | None = None
    metrics: dict = field(default_factory=dict)  # diagnostics for the report (errors, timings excluded)


class Method(ABC):
    name: ClassVar[str]
    requires: tuple[str, ...] = ()         # statistics this method reads (stats.COLLECTORS, "gradients:<n>")
    layerwise: bool = True                 # independent per block => the flow fans out per block
    # Sequential methods only: statistics taken from the DENSE model by the saliency stage (their
    # `requires` are collected on the fly, through the already-compressed blocks).
    dense_requires: tuple[str, ...] = ()
    # Methods that rewrite the model before compressing it (QUAD): the flow runs `transform` once and
    # compresses the transformed checkpoint.
    transforms_model: bool = False

    def __init__(self, config):
        self.config = config

    def resolve(self, model_config):
        """The method config as it will really run on this model (e.g. a size capped by the model's
        dimensions); preflight stores it in the recipe, so the manifest says what was used."""
        return self.config

    @property
    def tunes(self) -> bool:
        """Whether the flow runs `tune` on the packed checkpoint (QUAD's PEFT)."""
        return False

    def tune(self, src, dst, windows) -> dict:
        """Write a tuned copy of the packed checkpoint `src` into `dst`; returns the training record."""
        raise NotImplementedError

    def transform(self, src, dst, *stats) -> None:
        """Write the transformed dense checkpoint of `src` into `dst` (transforms_model methods only)."""
        raise NotImplementedError

    def check(self, linear_shapes: dict[str, tuple[int, int]]) -> None:
        """Preflight on {qualified linear name: (out_features, in_features)}; raise BadInput."""

    @abstractmethod
    def compress_linear(self, name: str, weight: torch.Tensor, stats: dict[str, torch.Tensor]) -> CompressedLinear:
        """Compress one weight [out, in]; `stats` holds this linear's statistics by collector name."""

    @abstractmethod
    def dequantize(self, c: CompressedLinear) -> torch.Tensor:
        """The weight the packed layer computes with (fp32), for diagnostics and tests."""


def check_group_size(group_size: int | None, linear_shapes: dict[str, tuple[int, int]]) -> None:
    if group_size is None:
        return
    bad = sorted({in_f for _, (_, in_f) in linear_shapes.items() if in_f % group_size})
    if bad:
        raise BadInput(f"group size {group_size} does not divide in_features {', '.join(map(str, bad))} "
                       f"of the targeted linears; choose a divisor (e.g. 64 or 32) or per-channel")
