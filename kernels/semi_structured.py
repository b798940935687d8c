"""NoWag-P / Wanda 2:4 ("nm" with n=2, m=4) through torch's semi-structured sparsity on CUDA.

torch.sparse.to_sparse_semi_structured compresses a dense 2:4 weight into the layout the sparse
tensor cores (Ampere and newer) read, and ``F.linear`` with it runs the sparse GEMM. It needs a CUDA
device of compute capability 8.0+, fp16/bf16 activations, and shapes the kernels accept (the weight's
rows a multiple of 64 and its columns a multiple of 128 cover both cuSPARSELt and CUTLASS); everything
else keeps the dense reference path (decode, then ``F.linear``).
"""

from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)


def semi_structured_reason(n: int, m: int, out_features: int, in_features: int, x: torch.Tensor) -> str | None:
    """Why the 2:4 sparse GEMM cannot run for this layer and input, or None when it can."""
    if (n, m) != (2, 4):
        return f"{n}:{m} is not 2:4"
    if not x.is_cuda:
        return "activations are not on a CUDA device"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"activation dtype {x.dtype} is not float16/bfloat16"
    if torch.cuda.get_device_capability(x.device) < (8, 0):
        return "the GPU has no sparse tensor cores (compute capability < 8.0)"
    if out_features % 64 or in_features % 128:
        return f"weight shape {out_features}x{in_features} is not a multiple of 64x128"
    return None


def to_semi_structured(dense_weight: torch.Tensor) -> torch.Tensor:
    """The 2:4 dense weight (zeros included) as torch's compressed semi-structured tensor."""
    from torch.sparse import to_sparse_semi_structured

    return to_sparse_semi_structured(dense_weight)
