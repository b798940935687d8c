"""Export an artifact for other runtimes: ``squeezeflow export ARTIFACT --format compressed-tensors|hf``.

``hf``: a Hub-ready folder, the artifact's own files (packed weights, config, tokenizer) and its model card
(README.md), without the run's internals (manifest.json, report/); ``--push REPO_ID`` uploads it with
huggingface_hub (token: HF_TOKEN / ``huggingface-cli login``, or the Prefect Secret block named by
SQUEEZEFLOW_HF_TOKEN_BLOCK).

``compressed-tensors`` is the checkpoint format transformers (with compressed-tensors installed) and vLLM
read for quantized models. What it can express, we translate tensor by tensor, without loading the model:

* "intq" (RTN, GPTQ): its "pack-quantized" format. The two layouts agree bit for bit: both pack each
  row's codes as a dense little-endian bitstream into int32 words (32 codes in exactly ``bits`` words).
  compressed-tensors stores signed codes ``q - 2**(bits-1)`` and packs them with that offset added back,
  so our unsigned ``qweight`` words *are* its ``weight_packed``; it dequantizes ``(q_signed - z_signed) *
  scale == (q - z) * scale``, our formula.

  - Symmetric grids (every zero point is 2**(bits-1): the ``-sym`` presets) are written as symmetric
    schemes, with no zero-point tensor: the layout vLLM's Marlin kernels serve (4 and 8 bits) and that
    transformers loads.
  - Asymmetric grids need the zero point ``z - 2**(bits-1)``, packed like the codes but along the output
    dimension: ``ceil(out * bits / 32)`` rows ("packed", what compressed-tensors writes and vLLM reads).
    transformers cannot load that one today: compressed-tensors (<= 0.20) builds the model's zero-point
    parameter unpacked, ``[out, groups]``, and the load stops on the shape mismatch (llm-compressor issue
    1618). The default, "padded", writes the same packed words in an ``[out, groups]`` int32 tensor whose
    rows past the packed ones are zero: its decompression reads only the packed rows, so transformers
    loads it and gets our weights exactly. Pass ``zero_points="packed"`` for vLLM.
  - Scales: float16 by default, exactly our values (intq stores fp16 scales); bfloat16 rounds them.
* "sparse" / "nm" (pruning: magnitude, Wanda, NoWag-P, 2:4): the dense weight with its zeros, as a
  plain tensor (vLLM loads it as an ordinary checkpoint).
* no squeezeflow quantization_config at all (layer pruning, QUAD-free transforms): passed through.

Every other format is refused with the reason (see ``UNSUPPORTED``). The README.md is rewritten for the
format written (how to load it without Squeezeflow).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import BadInput

EXPORT_FORMATS = ("compressed-tensors", "hf")
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
ZERO_POINT_LAYOUTS = ("padded", "packed")
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


def export(ref: str, dest: str | Path, fmt: str = "compressed-tensors", *, scale_dtype: str = "float16",
           zero_points: str = "padded", push: str | None = None) -> Path:
    """Write ``ref`` (artifact dir, s3:// URI or model/recipe@alias) to ``dest`` in ``fmt``; returns ``dest``.
    ``push``: a Hub repo id to upload the written folder to."""
    if fmt not in EXPORT_FORMATS:
        raise BadInput(f"export format {fmt!r} is not supported; choose one of {', '.join(EXPORT_FORMATS)}")
    if scale_dtype not in SCALE_DTYPES:
        raise BadInput(f"scale dtype {scale_dtype!r} is not supported; choose one of {', '.join(SCALE_DTYPES)}")
    if zero_points not in ZERO_POINT_LAYOUTS:
        raise BadInput(f"zero-point layout {zero_points!r} is not supported; choose one of "
                       f"{', '.join(ZERO_POINT_LAYOUTS)}")
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise BadInput(f"export destination {dest} exists and is not empty")
    token = hub_token() if push else None   # a missing token is found before any work
    src = _artifact_dir(ref)
    if fmt == "hf":
        _export_hf(src, dest, push)
    else:
        _export_compressed_tensors(src, dest, SCALE_DTYPES[scale_dtype], zero_points, push)
    if push:
        push_to_hub(dest, push, token)
    return dest


def _export_compressed_tensors(src: Path, dest: Path, scale_dtype: torch.dtype, zero_points: str,
                               push: str | None) -> None:
    config = json.loads((src / "config.json").read_text())
    modules = _packed_modules(config)
    _refuse_unsupported(modules)
    dtype = _checkpoint_dtype(config)

    with _staging(dest) as out:
        weight_map, schemes = _write_tensors(src, out, modules, dtype, scale_dtype, zero_points)
        _copy_model_files(src, out)
        if (src / _INDEX).exists():
            index = json.loads((src / _INDEX).read_text())
            index["weight_map"] = dict(sorted(weight_map.items()))
            (out / _INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        config.pop("quantization_config", None)
        config.pop("transformers_weights", None)  # the guard against plain loads of the packed format
        if schemes:
            config["quantization_config"] = compressed_tensors_config(_group_modules(schemes))
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _write_card(src, out, config, push)


def _export_hf(src: Path, dest: Path, push: str | None) -> None:
    """The artifact's model files as they are, and its model card."""
    with _staging(dest) as out:
        for p in sorted(src.iterdir()):
            if p.is_file() and p.name not in _NOT_EXPORTED:
                shutil.copy2(p, out / p.name)
        _write_card(src, out, json.loads((src / "config.json").read_text()), push)
        if not (out / "README.md").exists():
            raise BadInput(f"{src} has neither a README.md nor a manifest.json to write a model card from; "
                           "export an artifact of a squeezeflow run")


def _write_card(src: Path, out: Path, config: Mapping[str, Any], push: str | None) -> None:
    """README.md for the format in `out`, from the artifact's manifest (the card assemble wrote, redone for
    another format or with the Hub repo id in its examples); without a manifest the artifact's own card."""
    from .modelcard import README, WHERE, card_from_manifest

    if (src / "manifest.json").is_file():
        manifest = json.loads((src / "manifest.json").read_text())
        (out / README).write_text(card_from_manifest(config, manifest, where=push or WHERE), encoding="utf-8")
    elif (src / README).is_file():
        shutil.copy2(src / README, out / README)


class _staging:
    """A temporary folder beside `dest` whose files move into `dest` only when everything was written."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest

    def __enter__(self) -> Path:
        parent = self.dest.parent if self.dest.parent.exists() else None
        self._tmp = tempfile.TemporaryDirectory(dir=parent)
        out = Path(self._tmp.name) / "export"
        out.mkdir()
        return out

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.dest.mkdir(parents=True, exist_ok=True)
                for p in sorted((Path(self._tmp.name) / "export").iterdir()):
                    shutil.move(str(p), self.dest / p.name)
        finally:
            self._tmp.cleanup()


def hub_token() -> str | None:
    """The Hub token: HF_TOKEN (or huggingface_hub's own login, None here), else the Prefect Secret block
    named by SQUEEZEFLOW_HF_TOKEN_BLOCK. Never logged."""
    if os.environ.get("HF_TOKEN", "").strip():
        return os.environ["HF_TOKEN"].strip()
    block = os.environ.get("SQUEEZEFLOW_HF_TOKEN_BLOCK", "").strip()
    if not block:
        return None
    from .signing import _secret_block   # signing already reads Prefect Secret blocks; the library does not

    value = _secret_block(block, "SQUEEZEFLOW_HF_TOKEN_BLOCK").decode().strip()
    if not value:
        raise BadInput(f"Prefect Secret block {block!r} holds an empty token")
    return value


def push_to_hub(folder: Path, repo_id: str, token: str | None) -> str:
    """Create the model repo if needed and upload `folder`; returns the commit URL. Not tested offline."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                 commit_message="Upload from squeezeflow export")
    except Exception as e:  # noqa: BLE001 - auth, network, bad repo id: one line, never the token
        raise BadInput(f"push to the Hub repo {repo_id!r} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                       ) from None
    return str(getattr(info, "commit_url", info))


def compressed_tensors_config(groups: Mapping[tuple[int, int, bool], list[str]]) -> dict[str, Any]:
    """The ``quantization_config`` for pack-quantized group-wise int weights, one config group per
    (bits, group_size, symmetric) naming its modules exactly (no "Linear" wildcard: other linears stay dense)."""
    config_groups = {}
    for i, ((bits, group_size, sym), names) in enumerate(sorted(groups.items())):
        config_groups[f"group_{i}"] = {
            "targets": sorted(names),
            "weights": {"num_bits": bits, "type": "int", "symmetric": sym, "group_size": group_size,
                        "strategy": "group", "dynamic": False},
            "input_activations": None,
            "output_activations": None,
            "format": CT_FORMAT,
        }
    return {"quant_method": "compressed-tensors", "format": CT_FORMAT, "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": [], "kv_cache_scheme": None,
            "global_compression_ratio": None, "sparsity_config": {}}


def intq_to_compressed_tensors(fields: Mapping[str, torch.Tensor], bits: int, group_size: int, dtype: torch.dtype,
                               scale_dtype: torch.dtype = torch.float16, zero_points: str = "padded"
                               ) -> tuple[dict[str, torch.Tensor], bool]:
    """One "intq" layer's fields -> (its pack-quantized tensors keyed relative to the module, symmetric?)."""
    from squeezeflow.kernels.intpack import pack_rows

    qweight, scales, zeros = fields["qweight"], fields["scales"], fields["zeros"]
    out_features = qweight.shape[0]
    in_features = scales.shape[1] * group_size
    sym = bool((zeros == 2 ** (bits - 1)).all())
    tensors = {
        "weight_packed": qweight.contiguous(),  # identical layout, see the module docstring
        "weight_scale": scales.to(scale_dtype).contiguous(),
        "weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64),
    }
    if not sym:
        # Packed along the output dimension: transpose, pack each row, transpose back.
        packed = pack_rows(zeros.to(torch.int64).T.contiguous(), bits).T.contiguous()
        if zero_points == "padded":
            padded = torch.zeros(out_features, packed.shape[1], dtype=torch.int32)
            padded[:packed.shape[0]] = packed
            packed = padded
        tensors["weight_zero_point"] = packed
    if "bias" in fields:
        tensors["bias"] = fields["bias"].to(dtype)
    return tensors, sym


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
    # An MoE's packed experts are per-expert linears (squeezeflow/moe.py); transformers builds fused experts
    # that these names do not fit: a plain load would fail or, worse, initialize the experts at random.
    experts = sorted(n for n in modules if re.search(r"\.experts\.\d+\.", n))
    if experts:
        raise BadInput(f"cannot export a mixture-of-experts artifact to compressed-tensors ({experts[0]} is one "
                       f"of {len(experts)} per-expert packed linears); `--format hf` keeps the packed form, which "
                       f"loads after `import squeezeflow`")
    bad = sorted({e["format"] for e in modules.values() if e["format"] != "intq" and e["format"] not in _DENSE_FORMATS})
    if bad:
        fmt = bad[0]
        why = UNSUPPORTED.get(fmt, "it has no compressed-tensors equivalent")
        raise BadInput(f"cannot export format {fmt!r} to compressed-tensors: {why} "
                       f"(exportable: intq from RTN/GPTQ, pruned sparse/nm as dense, plain checkpoints)")


def _group_modules(schemes: Mapping[str, tuple[int, int, bool]]) -> dict[tuple[int, int, bool], list[str]]:
    groups: dict[tuple[int, int, bool], list[str]] = {}
    for name, scheme in schemes.items():
        groups.setdefault(scheme, []).append(name)
    return groups


def _copy_model_files(src: Path, out: Path) -> None:
    """Tokenizer, generation config, chat template...: every file but weights, config, card and run records."""
    for p in sorted(src.iterdir()):
        if p.name in _NOT_EXPORTED or p.suffix == ".safetensors" or p.name in (_INDEX, "config.json", "README.md"):
            continue
        if p.is_file():
            shutil.copy2(p, out / p.name)


def _checkpoint_dtype(config: Mapping[str, Any]) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise BadInput(f"config.json names dtype {name!r}, which is not a torch float dtype")
    return dtype


def _write_tensors(src: Path, out: Path, modules: Mapping[str, Mapping[str, Any]], dtype: torch.dtype,
                   scale_dtype: torch.dtype, zero_points: str
                   ) -> tuple[dict[str, str], dict[str, tuple[int, int, bool]]]:
    """Translate every shard; a packed module's tensors go to the shard that held its first field.
    Returns the new weight map (tensor name -> shard file name) and each intq module's
    (bits, group_size, symmetric)."""
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
    schemes: dict[str, tuple[int, int, bool]] = {}
    for shard in shards:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(shard, "pt") as f:
            keys = sorted(f.keys())
        for key in keys:
            module, _, _field = key.rpartition(".")
            if module in modules:
                if module not in done:
                    done.add(module)
                    converted, sym = _convert_module(module, modules[module], where, dtype, shapes.get(module),
                                                     scale_dtype, zero_points)
                    for field, t in converted.items():
                        tensors[f"{module}.{field}"] = t
                    if modules[module]["format"] == "intq":
                        schemes[module] = (int(modules[module]["bits"]), int(modules[module]["group_size"]), sym)
                continue
            tensors[key] = _read(where, key)
        save_file(tensors, str(out / shard.name), metadata={"format": "pt"})
        weight_map.update({k: shard.name for k in tensors})
    missing = sorted(set(modules) - done)
    if missing:
        raise BadInput(f"quantization_config lists modules with no tensors in the checkpoint: {missing[:3]}")
    return weight_map, schemes


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
                    shape: tuple[int, int] | None, scale_dtype: torch.dtype, zero_points: str
                    ) -> tuple[dict[str, torch.Tensor], bool]:
    from squeezeflow.kernels.formats import make_module

    prefix = name + "."
    fields = {k[len(prefix):]: _read(where, k) for k in where if k.startswith(prefix) and "." not in k[len(prefix):]}
    params = {k: v for k, v in entry.items() if k != "format"}
    if entry["format"] == "intq":
        return intq_to_compressed_tensors(fields, int(params["bits"]), int(params["group_size"]), dtype,
                                          scale_dtype, zero_points)
    # Pruned formats: decode through the format's own module, so the dense weight is exactly what our
    # forward computes with.
    assert shape is not None
    module = make_module(entry["format"], params, shape[1], shape[0], bias="bias" in fields)
    module.load_state_dict(fields, strict=True)
    tensors = {"weight": module.dequantize(dtype).contiguous()}
    if "bias" in fields:
        tensors["bias"] = fields["bias"].to(dtype)
    return tensors, False
