"""Rows of one 2-D checkpoint tensor (an embedding, an LM head), read with pread: never the whole matrix.

A Llama-3 vocabulary's embedding and head are 128256 rows each, 0.5 GiB apiece in bf16 and twice that in
fp32: materialized whole they were the largest part of a streamed evaluation's peak. The embedding lookup
needs only the rows of the tokens it sees, and the head's logits can be built a slice of the vocabulary at a
time. The bytes come through plain reads, not the safetensors mmap: mapped pages of a file count in the
process's resident memory for as long as the file is open, which is exactly what this module avoids.

Values are bit-identical to the whole tensor's: a row is the same bytes, converted the same way.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


class MatrixRows:
    """Row ranges and gathers of tensor `key` of safetensors file `path`."""

    def __init__(self, path: Path, key: str):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            info = json.loads(f.read(n))[key]
        if len(info["shape"]) != 2 or info["dtype"] not in _DTYPES:
            raise ValueError(f"{key}: rows of a 2-D float tensor only, not {info['dtype']} {info['shape']}")
        self.path, self.key = Path(path), key
        self.stored = _DTYPES[info["dtype"]]
        self.shape = tuple(info["shape"])
        self.row_bytes = self.shape[1] * self.stored.itemsize
        self._start = 8 + n + info["data_offsets"][0]

    def _read(self, fd: int, start: int, stop: int) -> torch.Tensor:
        size = (stop - start) * self.row_bytes
        buf = bytearray(size)
        view, done = memoryview(buf), 0
        while done < size:  # pread may return less than asked (large reads, signals)
            got = os.preadv(fd, [view[done:]], self._start + start * self.row_bytes + done)
            if got <= 0:
                raise OSError(f"{self.path}: short read of {self.key}")
            done += got
        return torch.frombuffer(buf, dtype=self.stored).view(stop - start, self.shape[1])

    def rows(self, start: int, stop: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Rows [start, stop) in `dtype` on `device`."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            return self._read(fd, start, stop).to(device=device, dtype=dtype)
        finally:
            os.close(fd)

    def gather(self, ids: torch.Tensor, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(the distinct rows `ids` name [U, d] in `dtype` on `device`, ids renumbered into them): an
        embedding lookup is then `F.embedding(renumbered, rows)`, the same values as the whole matrix's."""
        distinct, renumbered = torch.unique(ids.cpu(), sorted=True, return_inverse=True)
        out = torch.empty(distinct.numel(), self.shape[1], dtype=dtype, device=device)
        wanted = distinct.tolist()
        if wanted and not 0 <= wanted[0] <= wanted[-1] < self.shape[0]:
            raise IndexError(f"{self.key}: token id out of range 0..{self.shape[0] - 1}")
        fd = os.open(self.path, os.O_RDONLY)
        try:
            i = 0
            while i < len(wanted):  # one read per run of consecutive rows
                j = i + 1
                while j < len(wanted) and wanted[j] == wanted[j - 1] + 1:
                    j += 1
                out[i:j] = self._read(fd, wanted[i], wanted[j - 1] + 1).to(device=device, dtype=dtype)
                i = j
        finally:
            os.close(fd)
        return out, renumbered.to(device)
