"""Packing the compressed blocks into an HF-loadable checkpoint in the kernel formats, and the optional
tuning of that packed checkpoint (QUAD's PEFT)."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from .. import memo
from ..compute import device_of, stage_compute
from ..job import ModelInfo
from ..methods import get_method
from ..models import LayerStream
from ..recipes import Recipe
from ..shards import DEFAULT_MAX_SHARD_BYTES, ShardedWriter
from ..store import ArtifactStore, Ref, canonical_json

FORMAT_VERSION = 1


def pack(store: ArtifactStore, model: ModelInfo, recipe: Recipe, blocks: list[Ref],
         max_shard_size: int = DEFAULT_MAX_SHARD_BYTES) -> Ref:
    """Bit-pack every compressed block into the kernel format and write an HF-loadable directory, sharded
    at `max_shard_size` bytes (shards.py). Streamed: one block's tensors are in memory at a time (each
    shard's writer spools them to disk)."""
    from ..hf_integration import PLAIN_LOAD_GUARD
    from ..kernels.formats import packed_tensors

    src = Path(model.path)
    stream = LayerStream(src, model.trust_remote_code)
    modules: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        with ShardedWriter(out, max_shard_size, metadata={"format": "pt"}) as writer:
            for i, ref in enumerate(blocks):
                data = store.get_tensors(ref)
                layers = json.loads(store.get_tensors_metadata(ref)["layers"])
                prefix = f"model.layers.{i}"
                for name, info in layers.items():
                    fields = {k[len(name) + 1:]: v for k, v in data.items() if k.startswith(name + ".")}
                    for field, t in packed_tensors(info["format"], **fields, **info["params"]).items():
                        writer.add(f"{prefix}.{name}.{field}", t)
                    modules[f"{prefix}.{name}"] = {"format": info["format"], **info["params"]}
                del data
                # Everything in the block that is not a compressed linear (norms) is copied as it is, in the
                # checkpoint's dtype (an fp32 copy of a bf16 model's embedding would double its size).
                for k, v in stream.block_state(i, stored=True).items():
                    if k.rsplit(".", 1)[0] not in layers:
                        writer.add(f"{prefix}.{k}", v)
            for prefix in ("model.embed_tokens", "model.norm", "lm_head"):
                for k, v in stream.tensors(prefix, stored=True).items():
                    writer.add(f"{prefix}.{k}", v)
        config = json.loads((src / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "squeezeflow", "format_version": FORMAT_VERSION,
                                         "recipe": recipe.name, "modules": modules}
        # Without squeezeflow, transformers would skip our quant_method and load random weights: this
        # makes such a load fail, naming Squeezeflow (hf_integration.PLAIN_LOAD_GUARD).
        config["transformers_weights"] = PLAIN_LOAD_GUARD
        (out / "config.json").write_bytes(canonical_json(config))
        for f in sorted(src.iterdir()):
            if f.name.startswith(("tokenizer", "special_tokens", "generation_config", "chat_template")):
                shutil.copyfile(f, out / f.name)
        return store.put_dir(out, kind="packed-model")


def tune(store: ArtifactStore, model: ModelInfo, recipe: Recipe, calib: Ref, packed: Ref) -> Ref:
    """The packed checkpoint after the method's tuning on the calibration windows (QUAD's PEFT)."""
    from ..calibration import CalibrationSet

    inputs = {"packed": packed, "calibration": calib, "method": recipe.methods[0]}
    if model.compute is not None:   # tuned on another device: another result (the default keeps its key)
        inputs["compute"] = model.compute.key_form()
    key = memo.stage_key("tune", inputs)
    return memo.stored_dir(store, key, "packed-model", lambda out: get_method(recipe.methods[0]).tune(
        store.materialize(packed), out, CalibrationSet.get(store, calib).windows,
        device=device_of(stage_compute(model))))
