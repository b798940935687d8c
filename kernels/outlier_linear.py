"""OutlierQuantLinear: the "intq_outliers" format, group-wise integer weights plus sparse fp16 outliers
(GWQ; any method that keeps a few weights exact).

Fields: those of "intq" (kernels/quant_linear.py: ``qweight``, ``scales``, ``zeros``, ``bias``), plus
the outliers as one CSR matrix by output row:

* ``outlier_row_ptr`` int32 ``[out + 1]``: row i's outliers are entries ``row_ptr[i] : row_ptr[i+1]``;
* ``outlier_col`` ``[nnz]``: their input columns, ascending within a row, in the smallest integer type
  that holds every column: uint8 when in_features <= 256, int16 when <= 32768, else int32;
* ``outlier_values`` float16 ``[nnz]``: their values.
Parameters: ``bits``, ``group_size`` (as "intq") and ``nnz``.

At an outlier position the integer code equals its group's zero-point, so the integer part contributes
exactly 0 there and the weight is

    W = dequant(qweight, scales, zeros) + CSR(outlier_row_ptr, outlier_col, outlier_values)

(a sum, not an overwrite). ``forward`` decodes W densely (the reference path, cacheable);
``forward_sparse`` computes dequant(Wq)·x + W_outlier·x with a torch sparse CSR product instead.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from .packed_linear import PackedLinear
from .quant_linear import QuantLinear
from .quant_linear import check_params as check_intq_params
from .triton_dispatch import use_triton

FORMAT_NAME = "intq_outliers"


def column_dtype(in_features: int) -> torch.dtype:
    """Smallest integer dtype that holds every column index 0 .. in_features - 1."""
    if in_features <= 256:
        return torch.uint8
    if in_features <= 32768:
        return torch.int16
    return torch.int32


class OutlierQuantLinear(QuantLinear):
    format_name = FORMAT_NAME
    triton_kernel = True
    compressed_tensors = None  # the fp16 outliers have no compressed-tensors equivalent
    vllm = ("not-served", "the sparse fp16 outliers have no vLLM kernel or compressed-tensors form; serve with "
            "transformers + import squeezeflow, or dequantize to a dense checkpoint first")
    packed_fields = ("qweight", "scales", "zeros", "outlier_row_ptr", "outlier_col", "outlier_values")

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, nnz: int,
                 bias: bool = False, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, bits, group_size, bias, dtype, device)
        if not 0 <= nnz <= in_features * out_features:
            raise ValueError(f"nnz must lie in [0, {in_features * out_features}], got {nnz}")
        self.nnz = nnz
        self.register_buffer("outlier_row_ptr", torch.zeros(out_features + 1, dtype=torch.int32, device=device))
        self.register_buffer("outlier_col", torch.zeros(nnz, dtype=column_dtype(in_features), device=device))
        self.register_buffer("outlier_values", torch.zeros(nnz, dtype=torch.float16, device=device))

    @staticmethod
    def check_params(params: Mapping[str, Any]) -> None:
        nnz = params.get("nnz")
        if isinstance(nnz, bool) or not isinstance(nnz, int) or nnz < 0:
            raise ValueError(f"format {FORMAT_NAME!r}: nnz must be a non-negative int, got {nnz!r}")
        check_intq_params({k: v for k, v in params.items() if k != "nnz"})

    @classmethod
    def from_params(cls, params, in_features, out_features, bias, dtype=torch.float32, device=None) -> OutlierQuantLinear:
        cls.check_params(params)
        return cls(in_features, out_features, int(params["bits"]), int(params["group_size"]), int(params["nnz"]),
                   bias, dtype, device)

    @staticmethod
    def pack_fields(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, keep: torch.Tensor,
                    outlier_values: torch.Tensor, bits: int, group_size: int, nnz: int,
                    bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``keep`` bool [out, in] marks the outliers; ``outlier_values`` holds their values in row-major
        order. The codes at those positions must equal their group's zero-point."""
        fields = QuantLinear.pack_fields(codes, scales, zeros, bits, group_size, bias)
        out_f, in_f = codes.shape
        if keep.dtype != torch.bool or keep.shape != codes.shape:
            raise ValueError(f"keep must be a bool mask shaped like codes {tuple(codes.shape)}")
        if int(keep.sum()) != nnz or outlier_values.numel() != nnz:
            raise ValueError(f"nnz = {nnz}, but keep marks {int(keep.sum())} and there are {outlier_values.numel()} values")
        zero_codes = zeros.float().repeat_interleave(group_size, dim=1)
        if not torch.equal(codes.float()[keep], zero_codes[keep]):
            raise ValueError("codes at outlier positions must equal their group's zero-point (dequantize to 0)")
        rows, cols = keep.nonzero(as_tuple=True)  # row-major: rows ascending, columns ascending per row
        row_ptr = torch.zeros(out_f + 1, dtype=torch.int64)
        row_ptr[1:] = torch.bincount(rows, minlength=out_f).cumsum(0)
        fields.update({"outlier_row_ptr": row_ptr.to(torch.int32), "outlier_col": cols.to(column_dtype(in_f)),
                       "outlier_values": outlier_values.detach().to(torch.float16).contiguous()})
        return fields

    def outliers_csr(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        # The indices come from a file: check them, since torch does not bounds-check sparse kernels.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            return torch.sparse_csr_tensor(self.outlier_row_ptr.to(torch.int64), self.outlier_col.to(torch.int64),
                                           self.outlier_values.to(dtype), (self.out_features, self.in_features),
                                           check_invariants=True)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        weight = super().dequantize(torch.float32)
        counts = (self.outlier_row_ptr[1:] - self.outlier_row_ptr[:-1]).to(torch.int64)
        rows = torch.repeat_interleave(torch.arange(self.out_features, device=counts.device), counts)
        weight[rows, self.outlier_col.to(torch.int64)] += self.outlier_values.to(torch.float32)
        return weight.to(dtype or self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Must override QuantLinear.forward: its Triton path knows nothing of the outliers.
        if not self.cache_dequantized and use_triton(x):
            from .triton_outliers import intq_outliers_linear

            return intq_outliers_linear(x, self.qweight, self.scales, self.zeros, self.outlier_row_ptr,
                                        self.outlier_col, self.outlier_values, self.bits, self.group_size, self.bias)
        return PackedLinear.forward(self, x)

    def forward_sparse(self, x: torch.Tensor) -> torch.Tensor:
        """dequant(Wq)·x + W_outlier·x with the outliers as a sparse CSR product (no dense outlier matrix)."""
        y = F.linear(x, QuantLinear.dequantize(self, x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        flat = x.reshape(-1, self.in_features)
        y_out = (self.outliers_csr(x.dtype) @ flat.T).T
        return y + y_out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr().replace(f"format={QuantLinear.format_name}", f"outliers={self.nnz}, format={FORMAT_NAME}")
