"""Evaluation streamed block by block: perplexity, and KL / top-1 agreement against the base model, with one
decoder block of each model in memory at a time, never a whole model (an 8B model's evaluation needed its
fp32 weights twice over; now it needs a block, the embedding and head, and the windows' hidden states).

The packed checkpoint streams through the same LayerStream as the dense one (the model's own blocks, masks
and rotary tables): its skeleton's listed linears are swapped for the packed formats' modules, exactly as
our transformers quantizer does when the artifact is loaded whole, and each block decodes its packed
weights once per pass. Windows go through in the batches the whole-model loops use (4 for perplexity), so
the numbers are the loaded model's.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..models import LayerStream
from .kl import kl_terms

PPL_BATCH, KL_BATCH = 4, 2  # the whole-model loops' batches (perplexity.py, kl.py)
CHUNK_WINDOWS = 32


class CheckpointStream(LayerStream):
    """LayerStream over any checkpoint we evaluate: dense, or packed (quantization_config lists the modules)."""

    def __init__(self, path: Path, trust_remote_code: bool = False, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        from ..hf_integration import replace_modules

        super().__init__(path, trust_remote_code, device, dtype)
        qc = getattr(self.config, "quantization_config", None) or {}
        self.packed = bool(qc.get("modules"))
        if self.packed:
            replace_modules(self.model, qc["modules"])

    def tensors(self, prefix: str, stored: bool = False) -> dict[str, torch.Tensor]:
        # Packed fields keep their stored dtype, as from_pretrained loads them (codes are integers, scales
        # fp16); dense weights are read in the compute dtype.
        if not self.packed or stored:
            return super().tensors(prefix, stored)
        from safetensors import safe_open

        out: dict[str, torch.Tensor] = {}
        for k, (f, source) in self._sources.items():
            if k.startswith(prefix + "."):
                with safe_open(f, "pt", device=str(self.device)) as st:
                    t = source.read(st)
                out[k[len(prefix) + 1:]] = t.to(self.dtype) if _dense_param(self.model, k) else t
        return out

    def head_modules(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """The final norm and LM head, materialized once for a whole pass."""
        norm = self._materialize(copy.deepcopy(self.inner.norm), "model.norm")
        lm_head = self._materialize(copy.deepcopy(self.model.get_output_embeddings()), "lm_head")
        return norm, lm_head

    @torch.no_grad()
    def final_hidden(self, windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
        """Each window's last hidden state [1, T, d], one block in memory at a time."""
        hidden = self.embed(list(windows))
        for i in range(self.num_layers):
            with self.block(i) as layer:
                for module in layer.modules():  # decode each packed weight once per pass, not per batch
                    if hasattr(module, "cache_dequantized"):
                        module.cache_dequantized = True
                hidden = self.forward_block(layer, hidden, batch_size)
        return hidden


    @torch.no_grad()
    def logits_batches(self, windows: torch.Tensor, batch_size: int):
        """Yield (ids, logits) per window; the blocks run on batches of `batch_size` windows, as the whole
        model's forward would."""
        from ..architectures import softcap_logits

        windows = windows.to(self.device)
        norm, lm_head = self.head_modules()
        # Hidden states of at most CHUNK_WINDOWS windows are alive: a long evaluation set takes more passes
        # over the blocks instead of more memory. CHUNK_WINDOWS is a multiple of the batch sizes, so the
        # batches (and their numbers) are the ones the whole model sees.
        for c in range(0, windows.shape[0], CHUNK_WINDOWS):
            chunk = windows[c:c + CHUNK_WINDOWS]
            hidden = self.final_hidden(chunk, batch_size)
            for s, h in enumerate(hidden):  # the head one window at a time: a 128k vocabulary's logits are large
                yield chunk[s:s + 1], softcap_logits(self.config, lm_head(norm(h)))


class WholeModel:
    """The same interface over a whole loaded model: for checkpoints in formats we do not stream (a peer
    tool's compressed-tensors export) and for the cloze tasks."""

    def __init__(self, net: torch.nn.Module):
        self.net = net
        param = next(net.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")

    @torch.no_grad()
    def logits_batches(self, windows: torch.Tensor, batch_size: int):
        windows = windows.to(self.device)
        for s in range(0, windows.shape[0], batch_size):
            ids = windows[s:s + batch_size]
            logits = self.net(input_ids=ids, use_cache=False).logits
            for j in range(ids.shape[0]):  # per window, as CheckpointStream yields them
                yield ids[j:j + 1], logits[j:j + 1]


def streamable(path: Path) -> bool:
    """Dense checkpoints and ours stream; another tool's quantized format loads whole through its own loader."""
    import json

    qc = json.loads((Path(path) / "config.json").read_text()).get("quantization_config") or {}
    return qc.get("quant_method", "squeezeflow") == "squeezeflow"


def _dense_param(model: torch.nn.Module, name: str) -> bool:
    """Whether checkpoint tensor `name` belongs to a plain module (cast to the compute dtype) rather than a
    packed one (kept as stored)."""
    module_path, _, _ = name.rpartition(".")
    try:
        module = model.get_submodule(module_path)
    except AttributeError:
        return True
    return not hasattr(module, "cache_dequantized")


def streamed_perplexity(stream: "CheckpointStream | WholeModel", windows: torch.Tensor,
                        on_windows: Callable[[int], None] | None = None) -> dict:
    """exp(mean next-token NLL) over the windows: evaluation/perplexity.py's definition, streamed."""
    nll, count, done = 0.0, 0, 0
    for ids, logits in stream.logits_batches(windows, PPL_BATCH):
        logits = logits.float()
        ids = ids.to(logits.device)
        nll += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                     reduction="sum"))
        count += ids[:, 1:].numel()
        done += ids.shape[0]
        if on_windows is not None:
            on_windows(done)
    return {"perplexity": math.exp(nll / count), "nll_sum": nll, "predicted_tokens": count}


def streamed_kl(stream: "CheckpointStream | WholeModel", base: CheckpointStream, windows: torch.Tensor) -> dict:
    """KL(base ‖ model) and top-1 agreement (evaluation/kl.py's definition), both models streamed."""
    totals = [0.0, 0, 0]
    for (_, q), (_, p) in zip(stream.logits_batches(windows, KL_BATCH), base.logits_batches(windows, KL_BATCH)):
        for i, v in enumerate(kl_terms(p[:, :-1], q[:, :-1])):
            totals[i] += v
    kl_sum, agree, positions = totals
    return {"kl": kl_sum / positions, "top1_agreement": agree / positions, "positions": positions,
            "direction": "KL(base || model), nats, fp64"}
