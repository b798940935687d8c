"""Size and effective bits per weight, measured from the bytes a packed checkpoint really holds."""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def tensor_bytes(path: Path) -> dict[str, int]:
    """{tensor name: bytes} over every *.safetensors file of a checkpoint directory."""
    out: dict[str, int] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                sl = st.get_slice(k)
                out[k] = _numel(sl.get_shape()) * _DTYPE_BYTES[sl.get_dtype()]
    return out


SPARSE_FORMATS = ("sparse", "nm")  # formats that store only the kept weights, in a `values` field


def stored_weights(path: Path, target_linears: dict[str, tuple[int, int]]) -> int:
    """How many weights of the targeted linears the checkpoint really stores: the length of `values`
    for the sparse formats, the nonzeros of a dense `weight` (e.g. a pruned dense export), else all."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    modules = (cfg.get("quantization_config") or {}).get("modules", {})
    kept = 0
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            keys = set(st.keys())
            for name, (out_f, in_f) in target_linears.items():
                fmt = modules.get(name, {}).get("format")
                if fmt in SPARSE_FORMATS and f"{name}.values" in keys:
                    kept += _numel(st.get_slice(f"{name}.values").get_shape())
                elif fmt is None and f"{name}.weight" in keys:
                    kept += _nonzeros(f, f"{name}.weight")
                elif fmt is not None and fmt not in SPARSE_FORMATS and any(k.startswith(name + ".") for k in keys):
                    kept += out_f * in_f
    return kept


def _nonzeros(f: Path, key: str) -> int:
    """Nonzeros of one tensor, its file opened for it alone: pages of a mapped file count in the resident
    memory until it is closed, and counting every linear through one open file held a 2 GB shard's worth."""
    with safe_open(f, "pt") as st:
        return int(st.get_tensor(key).count_nonzero())


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def size_report(path: Path, target_linears: dict[str, tuple[int, int]]) -> dict:
    """bits_per_weight over the targeted linears (every stored field of those modules, bias excluded),
    size_bytes of all weight files, and weight_sparsity: the fraction of the targeted weights the
    checkpoint does not store (sparse formats) or stores as exact zeros (dense). A dense checkpoint
    reports its storage dtype's bits."""
    nbytes = tensor_bytes(path)
    n_weights = sum(o * i for o, i in target_linears.values())
    linear_bytes = 0
    for name in target_linears:
        linear_bytes += sum(b for k, b in nbytes.items()
                            if k.startswith(name + ".") and not k.endswith(".bias"))
    files = sorted(Path(path).glob("*.safetensors"))
    cfg = json.loads((Path(path) / "config.json").read_text())
    return {"bits_per_weight": 8 * linear_bytes / n_weights, "size_bytes": sum(f.stat().st_size for f in files),
            "linear_bytes": linear_bytes, "linear_weights": n_weights,
            "weight_sparsity": round(1.0 - stored_weights(path, target_linears) / n_weights, 6),
            "quantized": "quantization_config" in cfg}
