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
POSITIONS = 128  # next-token positions whose logits exist at once (a 128k vocabulary: 64 MiB in fp32)
VOCAB_ROWS = 8192  # head rows multiplied at once
RESIDENT_HEAD = 256 << 20  # a head up to this size in the compute dtype is read once per pass


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
    def next_token_logits(self, windows: torch.Tensor, batch_size: int):
        """Yield (targets [1, n], logits [1, n, V]) for up to POSITIONS next-token positions of one window at a
        time, in window order; the blocks run on batches of `batch_size` windows, as the whole model's
        forward would."""
        windows = windows.to(self.device)
        # Hidden states of at most CHUNK_WINDOWS windows are alive: a long evaluation set takes more passes
        # over the blocks instead of more memory. CHUNK_WINDOWS is a multiple of the batch sizes, so the
        # batches (and their numbers) are the ones the whole model sees.
        for c in range(0, windows.shape[0], CHUNK_WINDOWS):
            chunk = windows[c:c + CHUNK_WINDOWS]
            hidden = self.final_hidden(chunk, batch_size)
            head = ChunkedHead(self)  # after the blocks: the embedding's and the head's rows are never both read
            for ids, h in zip(chunk, hidden):
                h = head.norm(h)
                for t in range(0, ids.shape[0] - 1, POSITIONS):
                    stop = min(t + POSITIONS, ids.shape[0] - 1)
                    yield ids[t + 1:stop + 1].unsqueeze(0), head.logits(h[:, t:stop])
            del head


class ChunkedHead:
    """The final norm and LM head of a streamed checkpoint, the head applied VOCAB_ROWS rows at a time: a 128k
    vocabulary's head (0.5 GiB in bf16) is read a slice at a time when it is larger than RESIDENT_HEAD, and
    no more than POSITIONS positions' logits exist at once. F.linear over row slices of the weight gives the
    values of the whole matrix's product (test_streamed_eval compares against the loaded model)."""

    def __init__(self, stream: LayerStream):
        self.config, self.dtype, self.device = stream.config, stream.dtype, stream.device
        self.norm = stream._materialize(copy.deepcopy(stream.inner.norm), "model.norm")
        module = stream.model.get_output_embeddings()
        key = "lm_head.weight" if "lm_head.weight" in stream._sources else (
            "model.embed_tokens.weight" if getattr(stream.config, "tie_word_embeddings", False) else None)
        self.rows = stream.matrix_rows(key) if key and type(module) is torch.nn.Linear else None
        self.module = self.weight = self.bias = None
        if self.rows is None:  # a packed or renamed head: the module, whole
            self.module = stream._materialize(copy.deepcopy(module), "lm_head")
            return
        if "lm_head.bias" in stream._sources:
            self.bias = _read(stream, "lm_head.bias")
        if self.rows.shape[0] * self.rows.shape[1] * self.dtype.itemsize <= RESIDENT_HEAD:
            self.weight = self.rows.rows(0, self.rows.shape[0], self.dtype, self.device)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Soft-capped logits [.., V] of normed hidden states h [.., d], as the model's forward gives them."""
        from ..architectures import softcap_logits

        if self.module is not None:
            return softcap_logits(self.config, self.module(h))
        vocab = self.rows.shape[0]
        out = torch.empty(*h.shape[:-1], vocab, dtype=self.dtype, device=self.device)
        for v in range(0, vocab, VOCAB_ROWS):
            stop = min(v + VOCAB_ROWS, vocab)
            w = self.weight[v:stop] if self.weight is not None else self.rows.rows(v, stop, self.dtype, self.device)
            out[..., v:stop] = F.linear(h, w, None if self.bias is None else self.bias[v:stop])
        return softcap_logits(self.config, out)


def _read(stream: LayerStream, name: str) -> torch.Tensor:
    """One small checkpoint tensor, in the compute dtype."""
    from safetensors import safe_open

    f, source = stream._sources[name]
    with safe_open(f, "pt", device=str(stream.device)) as st:
        return source.read(st).to(stream.dtype)


class WholeModel:
    """The same interface over a whole loaded model: for checkpoints in formats we do not stream (a peer
    tool's compressed-tensors export) and for the cloze tasks."""

    def __init__(self, net: torch.nn.Module):
        self.net = net
        param = next(net.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")

    @torch.no_grad()
    def next_token_logits(self, windows: torch.Tensor, batch_size: int):
        windows = windows.to(self.device)
        for s in range(0, windows.shape[0], batch_size):
            ids = windows[s:s + batch_size]
            logits = self.net(input_ids=ids, use_cache=False).logits
            for j in range(ids.shape[0]):  # per window and slice of positions, as CheckpointStream yields them
                for t in range(0, ids.shape[1] - 1, POSITIONS):
                    stop = min(t + POSITIONS, ids.shape[1] - 1)
                    yield ids[j:j + 1, t + 1:stop + 1], logits[j:j + 1, t:stop]


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
    nll, count = 0.0, 0
    per_window = windows.shape[1] - 1  # next-token positions of a window
    for targets, logits in stream.next_token_logits(windows, PPL_BATCH):
        logits = logits.float()
        targets = targets.to(logits.device)
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"))
        count += targets.numel()
        if on_windows is not None and count % per_window == 0:
            on_windows(count // per_window)
    return {"perplexity": math.exp(nll / count), "nll_sum": nll, "predicted_tokens": count}


def streamed_kl(stream: "CheckpointStream | WholeModel", base: CheckpointStream, windows: torch.Tensor) -> dict:
    """KL(base ‖ model) and top-1 agreement (evaluation/kl.py's definition), both models streamed."""
    totals = [0.0, 0, 0]
    for (_, q), (_, p) in zip(stream.next_token_logits(windows, KL_BATCH), base.next_token_logits(windows, KL_BATCH)):
        for i, v in enumerate(kl_terms(p, q)):
            totals[i] += v
    kl_sum, agree, positions = totals
    return {"kl": kl_sum / positions, "top1_agreement": agree / positions, "positions": positions,
            "direction": "KL(base || model), nats, fp64"}
