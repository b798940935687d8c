"""Writing a safetensors file tensor by tensor, without ever holding the whole file in memory.

`safetensors.torch.save` needs every tensor at once and returns the file as one bytes object; packing
a model that way holds the packed model two or three times over. Here each tensor's bytes go to a spool
file as soon as it is added (then the tensor can be freed); `close()` writes the header and copies the
spools after it in chunks. Peak memory: one tensor plus a copy buffer.

Layout (readable by safetensors, transformers and our loader): the header is canonical JSON (sorted
keys, compact, `__metadata__` sorted, padded with spaces to 8 bytes), as `store.canonical_safetensors`
makes it. The data region holds the tensors grouped by element size, largest first, each group in the
order the tensors were added, so every tensor starts at a multiple of its element size. Same tensors
added in the same order => same bytes.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path

import torch

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}


class AllOrNothing(ABC):
    """A writer used as a context: `close()` (publish what was written) on a clean exit, `discard()` (leave
    nothing behind) when the block raised."""

    @abstractmethod
    def close(self):
        """Make what was written appear, complete."""

    @abstractmethod
    def discard(self) -> None:
        """Remove everything written so far."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()


class SafetensorsWriter(AllOrNothing):
    """`with SafetensorsWriter(path, metadata) as w: w.add(name, tensor)`; the file appears on exit,
    complete (written beside it, then renamed), or not at all if the block raised."""

    def __init__(self, path: str | os.PathLike, metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.metadata = dict(metadata or {})
        self._spool_dir = tempfile.mkdtemp(prefix=".spool-", dir=self.path.parent)
        self._spools: dict[int, tuple] = {}   # element size -> (file, bytes written, [(name, dtype, shape, start)])
        self._names: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name!r} added twice")
        if tensor.dtype not in _DTYPES:
            raise TypeError(f"tensor {name!r}: dtype {tensor.dtype} has no safetensors code")
        self._names.add(name)
        size = tensor.element_size()
        if size not in self._spools:
            self._spools[size] = (open(Path(self._spool_dir) / f"{size}.bin", "w+b"), 0, [])
        f, written, entries = self._spools[size]
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        f.write(memoryview(data))
        entries.append((name, _DTYPES[tensor.dtype], list(tensor.shape), written))
        self._spools[size] = (f, written + data.nbytes, entries)

    def close(self) -> Path:
        header: dict = {}
        offset = 0
        order = sorted(self._spools, reverse=True)
        for size in order:
            _, written, entries = self._spools[size]
            ends = [start for _, _, _, start in entries[1:]] + [written]
            for (name, dtype, shape, start), end in zip(entries, ends):
                header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset + start, offset + end]}
            offset += written
        if self.metadata:
            header["__metadata__"] = dict(sorted(self.metadata.items()))
        raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as out:
                out.write(len(raw).to_bytes(8, "little") + raw)
                for size in order:
                    f = self._spools[size][0]
                    f.seek(0)
                    shutil.copyfileobj(f, out, 1 << 22)
            os.replace(tmp, self.path)
        finally:
            Path(tmp).unlink(missing_ok=True)
            self.discard()
        return self.path

    def discard(self) -> None:
        for f, _, _ in self._spools.values():
            f.close()
        self._spools.clear()
        shutil.rmtree(self._spool_dir, ignore_errors=True)
