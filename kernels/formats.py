"""Registry of packed formats: format name -> module class.

A packed checkpoint's quantization_config names a format per module, e.g.
``{"format": "intq", "bits": 4, "group_size": 64}``. The loader builds the module with
:func:`make_module`; the pack stage writes the tensors from :func:`packed_tensors`, each saved to
safetensors as ``<module>.<field>``.

A format class plugs in by providing:

* ``format_name: str``
* ``check_params(params) -> None``, a staticmethod raising ValueError for a bad config entry;
* ``from_params(params, in_features, out_features, bias, dtype=..., device=None) -> nn.Module``, a
  classmethod that validates ``params`` and returns an empty module whose buffers have the shapes
  and dtypes of the stored fields;
* ``pack_fields(**kwargs) -> dict[str, Tensor]``, which encodes one layer into those fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .eg_linear import EGLinear
from .fp8_linear import FP8Linear
from .outlier_linear import OutlierQuantLinear
from .quad_linear import QuadLinear
from .quant_linear import QuantLinear
from .rf8_linear import RF8Linear
from .sparse_linear import NMLinear, SparseLinear
from .vq_linear import VQLinear

FORMATS: dict[str, type[nn.Module]] = {cls.format_name: cls for cls in (QuantLinear, OutlierQuantLinear, SparseLinear, NMLinear, VQLinear,
                                                                        QuadLinear, RF8Linear, FP8Linear, EGLinear)}


def format_class(format_name: str) -> type[nn.Module]:
    """The module class of a format, or a ValueError naming the known formats."""
    try:
        return FORMATS[format_name]
    except KeyError:
        raise ValueError(f"unknown packed format {format_name!r}; known formats: {sorted(FORMATS)}") from None


def make_module(
    format_name: str,
    params: Mapping[str, Any],
    in_features: int,
    out_features: int,
    bias: bool,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Build the (empty) module for one layer of a packed checkpoint.

    ``params`` is the layer's quantization_config entry; a "format" key in it is ignored.
    """
    return format_class(format_name).from_params(params, in_features, out_features, bias, dtype=dtype, device=device)


def check_params(format_name: str, params: Mapping[str, Any]) -> None:
    """Validate one quantization_config entry without building a module."""
    format_class(format_name).check_params(params)


def packed_tensors(format_name: str, **fields: Any) -> dict[str, torch.Tensor]:
    """Encode one layer: field name -> tensor, e.g. for "intq"
    ``packed_tensors("intq", codes=..., scales=..., zeros=..., bits=4, group_size=64, bias=None)``
    returns ``{"qweight", "scales", "zeros"}`` (plus ``"bias"`` when given)."""
    return format_class(format_name).pack_fields(**fields)

