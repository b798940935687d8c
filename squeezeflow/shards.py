"""Sharded safetensors checkpoints, laid out as transformers lays them: `model.safetensors` when everything
fits in one shard, else `model-00001-of-0000N.safetensors` ... plus `model.safetensors.index.json`
({"metadata": {"total_size": bytes}, "weight_map": {tensor: shard file}}), which from_pretrained, vLLM and
the Hub read. Shards are cut in the order tensors are added (deterministic: same tensors in the same
order give the same files), each spooled to disk by SafetensorsWriter, so memory stays one tensor."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from .errors import BadInput
from .safetensors_stream import AllOrNothing, SafetensorsWriter

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# transformers' historical default (save_pretrained's "5GB", decimal), which also keeps every shard under
# S3's 5 GiB single-request limit.
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
MIN_SHARD_BYTES = 1 << 20
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}


def parse_size(text: str | int) -> int:
    """'5GB' (decimal, like transformers), '500MiB' (binary) or a byte count -> bytes; BadInput otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        n = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(text), re.IGNORECASE)
        if not m:
            raise BadInput(f"max shard size {text!r} is not a size such as 5GB, 500MB or 2GiB")
        n = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if n < MIN_SHARD_BYTES:
        raise BadInput(f"max shard size {text!r} is below the minimum of 1 MiB")
    return n


def shard_name(i: int, n: int) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors"


class ShardedWriter(AllOrNothing):
    """`with ShardedWriter(directory, max_bytes, metadata) as w: w.add(name, tensor)`. A tensor larger than
    `max_bytes` gets a shard of its own (as transformers does). Files appear on a clean exit only."""

    def __init__(self, directory: str | os.PathLike, max_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 metadata: dict[str, str] | None = None):
        self.dir = Path(directory)
        self.max_bytes = int(max_bytes)
        self.metadata = metadata
        self._done: list[tuple[Path, list[str]]] = []   # closed shards (temporary names) and their tensors
        self._open: SafetensorsWriter | None = None
        self._names: list[str] = []
        self._bytes = 0
        self.total_size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._open is not None and self._bytes + nbytes > self.max_bytes:
            self._roll()
        if self._open is None:
            self._open = SafetensorsWriter(self.dir / f".shard-{len(self._done):05d}.safetensors", self.metadata)
        self._open.add(name, tensor)
        self._names.append(name)
        self._bytes += nbytes
        self.total_size += nbytes

    def _roll(self) -> None:
        self._done.append((self._open.close(), self._names))
        self._open, self._names, self._bytes = None, [], 0

    def close(self) -> list[Path]:
        """Name the shards and write the index (only when there are several); returns the files written."""
        if self._open is not None or not self._done:
            if self._open is None:  # no tensor at all: still one (empty) checkpoint file
                self._open = SafetensorsWriter(self.dir / ".shard-00000.safetensors", self.metadata)
            self._roll()
        if len(self._done) == 1:
            path = self.dir / SINGLE
            os.replace(self._done[0][0], path)
            return [path]
        n, weight_map, files = len(self._done), {}, []
        for i, (tmp, names) in enumerate(self._done, start=1):
            path = self.dir / shard_name(i, n)
            os.replace(tmp, path)
            files.append(path)
            weight_map.update({k: path.name for k in names})
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (self.dir / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return files + [self.dir / INDEX]

    def discard(self) -> None:
        if self._open is not None:
            self._open.discard()
        for tmp, _ in self._done:
            tmp.unlink(missing_ok=True)


def weight_files(directory: str | os.PathLike) -> list[Path]:
    """The checkpoint's weight files in order: the index's shards, or the single model.safetensors."""
    directory = Path(directory)
    if (directory / INDEX).exists():
        weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
        return [directory / f for f in sorted(set(weight_map.values()))]
    return [directory / SINGLE]
