"""Export an artifact for other runtimes: ``squeezeflow export ARTIFACT --format compressed-tensors``.

compressed-tensors is the checkpoint format vLLM (and transformers) read for quantized models. What
it can express, we translate tensor by tensor, without loading the model:

* "intq" (RTN, GPTQ): its "pack-quantized" format. The two layouts agree bit for bit: both pack each
  row's codes as a dense little-endian bitstream into int32 words (32 codes in exactly ``bits`` words).
  compressed-tensors stores signed codes ``q - 2**(bits-1)`` and packs them with that offset added back,
  so our unsigned ``qweight`` words *are* its ``weight_packed``. Its asymmetric zero-point is signed
  too (``z - 2**(bits-1)``) and packed the same way along the output dimension, and it dequantizes
  ``(q_signed - z_signed) * scale == (q - z) * scale``, our formula.
* "sparse" / "nm" (pruning: magnitude, Wanda, NoWag-P, 2:4): the dense weight with its zeros, as a
  plain tensor (vLLM loads it as an ordinary checkpoint).
* no squeezeflow quantization_config at all (layer pruning, QUAD-free transforms): passed through.

Every other format is refused with the reason (see ``UNSUPPORTED``). The scales are written in the
checkpoint's dtype (float32 for our artifacts), so compressed-tensors' decompression computes
``(q - z) * scale`` in the same precision as our reference forward and the logits agree.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import BadInput

EXPORT_FORMATS = ("compressed-tensors",)
CT_FORMAT = "pack-quantized"
_DENSE_FORMATS = ("sparse", "nm")
_INDEX = "model.safetensors.index.json"
# Files of an artifact that describe our run, not the model: they stay behind.
_NOT_EXPORTED = {"manifest.json", "report"}

UNSUPPORTED = {
    "intq_outliers": "GWQ keeps ~1% of weights as sparse fp16 outliers added to the integer grid; "
                     "pack-quantized has no per-weight exceptions, and folding them in would need a dense weight",
    "vq": "NoWag-VQ stores codebook indices over d-dimensional vectors plus row/column norms; "
          "compressed-tensors only has scalar integer/float grids",
    "quad": "QUAD adds outlier columns and online Hadamard rotations to the architecture, "
            "which a compressed-tensors checkpoint of the base architecture cannot hold",
}


def export(ref: str, dest: str | Path, fmt: str = "compressed-tensors") -> Path:
    """Write ``ref`` (artifact dir, s3:// URI or model/recipe@alias) to ``dest`` in ``fmt``; returns ``dest``."""
    if fmt not in EXPORT_FORMATS:
        raise BadInput(f"export format {fmt!r} is not supported; choose one of {', '.join(EXPORT_FORMATS)}")
    src = _artifact_dir(ref)
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise BadInput(f"export destination {dest} exists and is not empty")
    config = json.loads((src / "config.json").read_text())
    modules = _packed_modules(config)
    _refuse_unsupported(modules)
    dtype = _checkpoint_dtype(config)

    with tempfile.TemporaryDirectory(dir=dest.parent if dest.parent.exists() else None) as tmp:
        out = Path(tmp) / "export"
        out.mkdir()
        weight_map = _write_tensors(src, out, modules, dtype)
        for p in sorted(src.iterdir()):
            if p.name in _NOT_EXPORTED or p.suffix == ".safetensors" or p.name == _INDEX:
                continue
            if p.is_file() and p.name != "config.json":
                shutil.copy2(p, out / p.name)
        if (src / _INDEX).exists():
            index = json.loads((src / _INDEX).read_text())
            index["weight_map"] = dict(sorted(weight_map.items()))
            (out / _INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        config.pop("quantization_config", None)
        groups = _config_groups(modules)
        if groups:
            config["quantization_config"] = compressed_tensors_config(groups)
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        dest.mkdir(parents=True, exist_ok=True)
        for p in sorted(out.iterdir()):
            shutil.move(str(p), dest / p.name)
    return dest


def compressed_tensors_config(groups: Mapping[tuple[int, int], list[str]]) -> dict[str, Any]:
    """The ``quantization_config`` for pack-quantized asymmetric group-wise int weights, one config group
    per (bits, group_size) naming its modules exactly (no "Linear" wildcard: other linears stay dense)."""
    config_groups = {}
    for i, ((bits, group_size), names) in enumerate(sorted(groups.items())):
        config_groups[f"group_{i}"] = {
            "targets": sorted(names),
            "weights": {"num_bits": bits, "type": "int", "symmetric": False, "group_size": group_size,
                        "strategy": "group", "dynamic": False},
            "input_activations": None,
            "output_activations": None,
            "format": CT_FORMAT,
        }
    return {"quant_method": "compressed-tensors", "format": CT_FORMAT, "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": [], "kv_cache_scheme": None,
            "global_compression_ratio": None, "sparsity_config": {}}


def intq_to_compressed_tensors(fields: Mapping[str, torch.Tensor], bits: int, group_size: int, dtype: torch.dtype
                               ) -> dict[str, torch.Tensor]:
    """One "intq" layer's fields -> its pack-quantized tensors (keys relative to the module)."""
    from squeezeflow.kernels.intpack import pack_rows

    qweight, scales, zeros = fields["qweight"], fields["scales"], fields["zeros"]
    out_features = qweight.shape[0]
    in_features = scales.shape[1] * group_size
    tensors = {
        "weight_packed": qweight.contiguous(),  # identical layout, see the module docstring
        "weight_scale": scales.to(dtype).contiguous(),
        # Packed along the output dimension: transpose, pack each row, transpose back.
        "weight_zero_point": pack_rows(zeros.to(torch.int64).T.contiguous(), bits).T.contiguous(),
        "weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64),
    }
    if "bias" in fields:
        tensors["bias"] = fields["bias"].to(dtype)
    return tensors


# --------------------------------------------------------------------------------------------------
def _artifact_dir(ref: str) -> Path:
    from .models import pull_artifact
    from .registry import verify_dir

    path = Path(ref).expanduser()
    if path.is_dir():
        if (path / "manifest.json").exists():
            verify_dir(path)  # an artifact is exported only if it still matches its manifest
    elif ref.startswith("s3://") or "@" in ref:
        path = pull_artifact(ref)
    else:
        raise BadInput(f"artifact {ref!r} is neither a directory nor a registry reference (s3://... or model/recipe@alias)")
    if not (path / "config.json").is_file():
        raise BadInput(f"artifact {ref!r} has no config.json")
    if not any(path.glob("*.safetensors")):
        raise BadInput(f"artifact {ref!r} has no *.safetensors weights")
    return path


def _packed_modules(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    qc = config.get("quantization_config")
    if qc is None:
        return {}
    method = qc.get("quant_method")
    if method != "squeezeflow":
        raise BadInput(f"artifact is already quantized with quant_method {method!r}; only squeezeflow artifacts "
                       "and plain checkpoints can be exported")
    return {name: dict(entry) for name, entry in qc.get("modules", {}).items()}


def _refuse_unsupported(modules: Mapping[str, Mapping[str, Any]]) -> None:
    bad = sorted({e["format"] for e in modules.values() if e["format"] != "intq" and e["format"] not in _DENSE_FORMATS})
    if bad:
        fmt = bad[0]
        why = UNSUPPORTED.get(fmt, "it has no compressed-tensors equivalent")
        raise BadInput(f"cannot export format {fmt!r} to compressed-tensors: {why} "
                       f"(exportable: intq from RTN/GPTQ, pruned sparse/nm as dense, plain checkpoints)")


def _config_groups(modules: Mapping[str, Mapping[str, Any]]) -> dict[tuple[int, int], list[str]]:
    groups: dict[tuple[int, int], list[str]] = {}
    for name, entry in modules.items():
        if entry["format"] == "intq":
            groups.setdefault((int(entry["bits"]), int(entry["group_size"])), []).append(name)
    return groups


def _checkpoint_dtype(config: Mapping[str, Any]) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise BadInput(f"config.json names dtype {name!r}, which is not a torch float dtype")
    return dtype


def _write_tensors(src: Path, out: Path, modules: Mapping[str, Mapping[str, Any]], dtype: torch.dtype
                   ) -> dict[str, str]:
    """Translate every shard; a packed module's tensors go to the shard that held its first field.
    Returns the new weight map (tensor name -> shard file name)."""
    shards = sorted(src.glob("*.safetensors"))
    where: dict[str, Path] = {}
    for shard in shards:
        with safe_open(shard, "pt") as f:
            for key in f.keys():
                where[key] = shard
    dense = sorted(n for n, e in modules.items() if e["format"] in _DENSE_FORMATS)
    shapes = _linear_shapes(src, dense) if dense else {}
    done: set[str] = set()
    weight_map: dict[str, str] = {}
    for shard in shards:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(shard, "pt") as f:
            keys = sorted(f.keys())
        for key in keys:
            module, _, _field = key.rpartition(".")
            if module in modules:
                if module not in done:
                    done.add(module)
                    for field, t in _convert_module(module, modules[module], where, dtype, shapes.get(module)).items():
                        tensors[f"{module}.{field}"] = t
                continue
            tensors[key] = _read(where, key)
        save_file(tensors, str(out / shard.name), metadata={"format": "pt"})
        weight_map.update({k: shard.name for k in tensors})
    missing = sorted(set(modules) - done)
    if missing:
        raise BadInput(f"quantization_config lists modules with no tensors in the checkpoint: {missing[:3]}")
    return weight_map


def _read(where: Mapping[str, Path], key: str) -> torch.Tensor:
    with safe_open(where[key], "pt") as f:
        return f.get_tensor(key)


def _linear_shapes(src: Path, names: list[str]) -> dict[str, tuple[int, int]]:
    """(out, in) of the named linears, from a meta-device skeleton of the model (no weights read):
    some formats (the "sparse" bitmask) do not pin their input width down exactly."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(src)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {}
    for name in names:
        module = model.get_submodule(name)
        shapes[name] = (module.out_features, module.in_features)
    return shapes


def _convert_module(name: str, entry: Mapping[str, Any], where: Mapping[str, Path], dtype: torch.dtype,
                    shape: tuple[int, int] | None) -> dict[str, torch.Tensor]:
    from squeezeflow.kernels.formats import make_module

    prefix = name + "."
    fields = {k[len(prefix):]: _read(where, k) for k in where if k.startswith(prefix) and "." not in k[len(prefix):]}
    params = {k: v for k, v in entry.items() if k != "format"}
    if entry["format"] == "intq":
        return intq_to_compressed_tensors(fields, int(params["bits"]), int(params["group_size"]), dtype)
    # Pruned formats: decode through the format's own module, so the dense weight is exactly what our
    # forward computes with.
    assert shape is not None
    module = make_module(entry["format"], params, shape[1], shape[0], bias="bias" in fields)
    module.load_state_dict(fields, strict=True)
    tensors = {"weight": module.dequantize(dtype).contiguous()}
    if "bias" in fields:
        tensors["bias"] = fields["bias"].to(dtype)
    return tensors
