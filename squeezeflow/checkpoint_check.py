"""Is this directory a checkpoint we can compress? Checked in preflight, before any server or heavy work.

`validate_checkpoint(path, ref)` raises BadInput with one line naming the problem for:
- the path: missing, a symlink loop or dangling link, not a directory;
- its files (config, index, weights, tokenizer files): symlink loops, dangling links, FIFOs and devices
  (reading those hangs or never ends);
- config.json: unreadable, not a JSON object, no or unknown `model_type`, values no model can be built from;
- weights: none (pickled ones are refused), safetensors headers that are broken, truncated, oversized or
  disagree with the file's size, a sharded index naming a missing shard or a tensor its shard lacks, a
  tensor in two shards;
- config vs weights: every tensor the config implies must be there with its shape and none may be left
  over, so a wrong layer count, vocabulary or hidden size is named before anything runs;
- NaN / Inf in any floating-point tensor (the first one is named).

The cost of the NaN/Inf check: it reads every weight byte once, a mask-and-compare per element over a
read-only memory map (no copy of the model in memory; 1.0 s for SmolLM2-135M's 513 MiB from the page cache on a busy 2-core machine). Doing
it at the first read of each tensor instead would be free, but the run would then fail inside a flow,
after the servers started and earlier blocks were compressed: the one place a user can be told cleanly is
preflight. The fingerprint already reads every byte of a new checkpoint once, so a model is read twice the
first time it is seen; a file's clean result is remembered under scratch/checkpoint-checks, keyed by its
path, size, mtime, ctime and inode, so later runs pay a stat per shard.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from .errors import BadInput
from .safe_read import describe_os_error, kind_of, open_regular, read_regular_file

MAX_HEADER_BYTES = 100_000_000      # safetensors' own limit on a header
MAX_JSON_BYTES = 64 << 20           # config.json, the shard index, tokenizer files are far below this
_CHECKED_NAMES = re.compile(r"config\.json|.*\.safetensors(\.index\.json)?|tokenizer.*|special_tokens_map\.json|"
                            r"added_tokens\.json|vocab\..*|merges\.txt|chat_template\..*|generation_config\.json")
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
               "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
# A float is NaN or ±Inf exactly when all of these bits of its pattern are set (exponent all ones; for
# e4m3fn, which has no Inf, exponent and mantissa all ones).
_NONFINITE_MASK = {"F64": (np.uint64, 0x7FF0_0000_0000_0000), "F32": (np.uint32, 0x7F80_0000),
                   "F16": (np.uint16, 0x7C00), "BF16": (np.uint16, 0x7F80), "F8_E5M2": (np.uint8, 0x7C),
                   "F8_E4M3": (np.uint8, 0x7F)}
_SCAN_ELEMENTS = 1 << 24            # elements per chunk of the NaN scan: 64 MiB of fp32
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def validate_checkpoint(path: Path, ref: str | None = None) -> None:
    """BadInput with one line unless `path` is a Hugging Face checkpoint directory whose files, config
    and weights agree and whose weights are all finite."""
    path = Path(path)
    ref = ref or str(path)
    _check_directory(path, ref)
    where = f"model directory {ref!r}"
    _check_entries(path, where)
    config = _read_json(path / "config.json", f"{where}: config.json")
    if not isinstance(config, dict):
        raise BadInput(f"{where}: config.json must hold a JSON object")
    shards = sorted(p for p in path.glob("*.safetensors"))
    if not shards:
        pickles = sorted(p.name for p in [*path.glob("*.bin"), *path.glob("*.pt"), *path.glob("*.pth")])
        hint = f" (found {', '.join(pickles)}: pickled weights are refused; convert to safetensors)" if pickles else ""
        raise BadInput(f"{where} has no *.safetensors weights{hint}")
    headers = {f: read_header(f, f"{where}: {f.name}") for f in shards}
    tensors = _tensor_index(path, headers, where)
    _check_against_config(path, config, tensors, where)
    for f, header in headers.items():
        check_finite(f, header, f"{where}: {f.name}")


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------
def _check_directory(path: Path, ref: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if e.errno == errno.ENOENT and not os.path.islink(path):
            from .models import KNOWN_MODELS

            raise BadInput(f"model path {ref!r} does not exist (give a known name: {', '.join(KNOWN_MODELS)}, "
                           "a local HF directory, an s3:// URI or model/recipe@alias)") from None
        raise BadInput(f"model path {ref!r} {describe_os_error(e)}") from None
    if kind_of(mode) != "a directory":
        raise BadInput(f"model path {ref!r} is not a directory (a model directory holds config.json and "
                       "*.safetensors weights)")


def _check_entries(path: Path, where: str) -> None:
    """Every file a loader may open must be a regular file: a FIFO hangs the tokenizer, a loop is an OSError."""
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except OSError as e:
        raise BadInput(f"{where} {describe_os_error(e)}") from None
    for entry in entries:
        if not _CHECKED_NAMES.fullmatch(entry.name):
            continue
        try:
            kind = kind_of(os.stat(entry.path).st_mode)
        except OSError as e:
            raise BadInput(f"{where}: {entry.name} {describe_os_error(e)}") from None
        if kind:
            raise BadInput(f"{where}: {entry.name} is {kind}, not a regular file")
    if not (path / "config.json").exists():
        raise BadInput(f"{where} has no config.json")


def _read_json(path: Path, what: str):
    data = read_regular_file(path, what, MAX_JSON_BYTES)
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except UnicodeDecodeError as e:
        raise BadInput(f"{what} is not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise BadInput(f"{what} is not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except ValueError as e:
        raise BadInput(f"{what}: {e}") from None


def _no_duplicate_keys(pairs):
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise ValueError(f"key {k!r} is given twice")
        seen[k] = v
    return seen


# --------------------------------------------------------------------------------------------------
# Safetensors headers
# --------------------------------------------------------------------------------------------------
def read_header(f: Path, what: str) -> dict[str, tuple[str, list[int], int, int]]:
    """name -> (dtype, shape, begin, end) from a safetensors file, offsets absolute in the file, after
    checking everything the format promises: a header of sane length that is a JSON object, known dtypes,
    shapes whose byte size matches the offsets, tensors tiling the data region exactly to the file's end."""
    fd = open_regular(f, what)
    try:
        size = os.fstat(fd).st_size
        if size < 8:
            raise BadInput(f"{what} is truncated: {size} bytes, not even the 8-byte header length")
        n = int.from_bytes(os.pread(fd, 8, 0), "little")
        if n > MAX_HEADER_BYTES:
            raise BadInput(f"{what}: header length {n} bytes is over the format's limit of {MAX_HEADER_BYTES}")
        if 8 + n > size:
            raise BadInput(f"{what} is truncated: its header needs {8 + n} bytes, the file has {size}")
        raw = os.pread(fd, n, 8)
    except OSError as e:
        raise BadInput(f"{what} {describe_os_error(e)}") from None
    finally:
        os.close(fd)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as e:
        raise BadInput(f"{what}: the safetensors header is not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(header, dict):
        raise BadInput(f"{what}: the safetensors header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise BadInput(f"{what}: __metadata__ must map strings to strings")
    data_start, out, spans = 8 + n, {}, []
    for name, info in header.items():
        shape = info.get("shape") if isinstance(info, dict) else None
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        dtype = info.get("dtype") if isinstance(info, dict) else None
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            raise BadInput(f"{what}: tensor {name!r} has unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise BadInput(f"{what}: tensor {name!r} has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise BadInput(f"{what}: tensor {name!r} has invalid data_offsets {offsets!r}")
        nbytes = int(np.prod(shape, dtype=object)) * DTYPE_BYTES[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise BadInput(f"{what}: tensor {name!r} of shape {shape} {dtype} needs {nbytes} bytes, its offsets "
                           f"span {offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], name))
        out[name] = (dtype, shape, data_start + offsets[0], data_start + offsets[1])
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise BadInput(f"{what}: tensor {name!r} starts at byte {begin} of the data, expected {position} "
                           "(tensors overlap or leave a gap)")
        position = end
    if data_start + position != size:
        state = "truncated" if data_start + position > size else "longer than its tensors"
        raise BadInput(f"{what} is {state}: the header describes {data_start + position} bytes, the file has {size}")
    return out


def _tensor_index(path: Path, headers: dict[Path, dict], where: str) -> dict[str, tuple[str, list[int]]]:
    """name -> (dtype, shape) over all shards; the shard index, if any, must agree with the shards."""
    where_is: dict[str, Path] = {}
    tensors: dict[str, tuple[str, list[int]]] = {}
    for f, header in headers.items():
        for name, (dtype, shape, _, _) in header.items():
            if name in where_is:
                raise BadInput(f"{where}: tensor {name!r} is in both {where_is[name].name} and {f.name}")
            where_is[name] = f
            tensors[name] = (dtype, shape)
    for index_file in sorted(path.glob("*.safetensors.index.json")):
        what = f"{where}: {index_file.name}"
        index = _read_json(index_file, what)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise BadInput(f"{what} has no weight_map of tensor names to shard files")
        for name, shard in weight_map.items():
            if "/" in shard or "\\" in shard or shard in ("", ".", ".."):
                raise BadInput(f"{what} names shard {shard!r}, which is not a file name in the model directory")
            if not (path / shard).exists():
                raise BadInput(f"{what} names shard {shard!r} (for {name!r}), which is missing")
            if where_is.get(name) != path / shard:
                raise BadInput(f"{what} puts tensor {name!r} in {shard}, which does not hold it")
    return tensors


# --------------------------------------------------------------------------------------------------
# Config against weights
# --------------------------------------------------------------------------------------------------
def _check_against_config(path: Path, config: dict, tensors: dict[str, tuple[str, list[int]]], where: str) -> None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise BadInput(f"{where}: config.json has no model_type")
    if model_type not in CONFIG_MAPPING:
        if "auto_map" in config:
            return  # remote code decides (and needs --trust-remote-code); we cannot build it here
        import transformers

        raise BadInput(f"{where}: unknown model_type {model_type!r} (transformers {transformers.__version__} "
                       "does not know it)")
    if config.get("quantization_config"):
        return  # a compressed artifact: preflight refuses it by name; its tensors are packed, not the config's
    from .moe_checkpoint import converted

    expected, allowed_missing = _expected_tensors(path, model_type, where)
    # Both sides by the names streaming uses: an MoE's experts one matrix per expert, whether the checkpoint
    # holds them per expert (Hub style) or fused (moe_checkpoint.py).
    tensors = {name: (dtype, shp) for key, (dtype, shape) in tensors.items()
               for name, _, shp in converted(model_type, key, shape)}
    _compare(config, expected, allowed_missing, tensors, where)


def _expected_tensors(path: Path, model_type: str, where: str) -> tuple[dict[str, list[int]], set[str]]:
    """The tensors (name -> shape) a model built from config.json has, from a skeleton on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # noqa: BLE001 - whatever transformers' validators raise, the cause is config.json
        if isinstance(e, ValueError) and "Unrecognized configuration class" in str(e):
            raise BadInput(f"{where}: model_type {model_type!r} is not a causal language model") from None
        raise BadInput(f"{where}: config.json does not describe a buildable model ({type(e).__name__}: "
                       f"{_first_line(e)})") from None
    from .moe import unfuse_experts

    unfuse_experts(model)
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {}
    return expected, set(tied)


def _compare(config: dict, expected: dict[str, list[int]], allowed_missing: set[str],
             tensors: dict[str, tuple[str, list[int]]], where: str) -> None:
    layers_in_weights = {int(m.group(1)) for k in tensors if (m := _LAYER.search(k))}
    n_layers = config.get("num_hidden_layers")
    if layers_in_weights and isinstance(n_layers, int) and max(layers_in_weights) + 1 != n_layers:
        raise BadInput(f"{where}: config.json says num_hidden_layers={n_layers}, the weights hold "
                       f"{max(layers_in_weights) + 1} decoder layers")
    for name, shape in expected.items():
        if name in tensors and tensors[name][1] != shape:
            vocab = config.get("vocab_size")
            hint = (f" (config.json vocab_size={vocab})" if "embed_tokens" in name or "lm_head" in name else "")
            raise BadInput(f"{where}: tensor {name!r} has shape {tensors[name][1]}, config.json implies "
                           f"{shape}{hint}")
    missing = sorted(k for k in expected if k not in tensors and k not in allowed_missing)
    if missing:
        raise BadInput(f"{where}: the weights lack {len(missing)} tensor(s) config.json implies, e.g. "
                       f"{', '.join(missing[:3])}")
    extra = sorted(k for k in tensors if k not in expected)
    if extra:
        raise BadInput(f"{where}: the weights hold {len(extra)} tensor(s) config.json does not describe, e.g. "
                       f"{', '.join(extra[:3])}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


# --------------------------------------------------------------------------------------------------
# NaN / Inf
# --------------------------------------------------------------------------------------------------
def _clean_marker(f: Path) -> Path:
    from .settings import scratch_dir

    st = os.stat(f)
    key = f"{os.path.realpath(f)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}|{st.st_dev}"
    return scratch_dir() / "checkpoint-checks" / hashlib.sha256(key.encode()).hexdigest()


def check_finite(f: Path, header: dict[str, tuple[str, list[int], int, int]], what: str) -> None:
    """BadInput naming the first tensor of `f` that holds a NaN or an infinity."""
    marker = _clean_marker(f)
    if marker.exists():
        return
    floats = sorted((begin, end, name, dtype) for name, (dtype, _, begin, end) in header.items()
                    if dtype in _NONFINITE_MASK and end > begin)
    if floats:
        fd = open_regular(f, what)
        try:
            for begin, end, name, dtype in floats:
                if _has_nonfinite(fd, begin, end, dtype):
                    raise BadInput(f"{what}: tensor {name!r} holds NaN or infinite values")
        finally:
            os.close(fd)
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError:
        pass  # a read-only scratch only means the scan runs again next time


def _has_nonfinite(fd: int, begin: int, end: int, dtype: str) -> bool:
    """Scanned in chunks read into memory and dropped (not mmapped: a mapped file's touched pages stay in
    the process's RSS, which made a 2 GB shard's check a 2 GB peak)."""
    word, mask = _NONFINITE_MASK[dtype]
    itemsize = np.dtype(word).itemsize
    pos = begin
    while pos < end:
        data = os.pread(fd, min(_SCAN_ELEMENTS * itemsize, end - pos), pos)
        usable = len(data) - len(data) % itemsize
        if usable == 0:
            break  # the file ends early: the header check reports a truncated file
        bits = np.frombuffer(data, dtype=word, count=usable // itemsize)
        if np.any((bits & word(mask)) == word(mask)):
            return True
        pos += usable
    return False
