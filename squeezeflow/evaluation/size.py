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
                n = 1
                for d in sl.get_shape():
                    n *= d
                out[k] = n * _DTYPE_BYTES[sl.get_dtype()]
    return out


def size_report(path: Path, target_linears: dict[str, tuple[int, int]]) -> dict:
    """bits_per_weight over the targeted linears (every stored field of those modules, bias excluded)
    and size_bytes of all weight files. A dense checkpoint reports its storage dtype's bits."""
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
            "quantized": "quantization_config" in cfg}
