"""Evaluation of a checkpoint loaded back from its files: perplexity, KL and agreement against the base
model, cloze accuracy, size and effective bits."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .. import progress
from ..config import EvalSpec
from ..job import ModelInfo, target_linears
from ..models import load_tokenizer
from ..rng import isolated_rng
from ..store import ArtifactStore, Ref


def eval_protocol(model: ModelInfo, spec: EvalSpec) -> dict[str, tuple[torch.Tensor, dict]]:
    """The held-out windows of each split and the protocol record that makes the number reproducible."""
    from ..calibration import eval_windows, load_text, tokenize_source, tokenizer_fingerprint

    tokenizer = load_tokenizer(Path(model.path), model.trust_remote_code)
    out = {}
    for split in spec.splits:
        text = load_text(split)
        ids = tokenize_source(text, tokenizer)
        windows = eval_windows(ids, spec.seqlen, spec.max_windows)
        out[split] = (windows, {"corpus_sha256": text.sha256, "corpus_tokens": int(ids.numel()),
                                "seqlen": spec.seqlen, "windows": int(windows.shape[0]),
                                "tokens": int(windows.numel()), "bos": False,
                                "selection": "non-overlapping windows, evenly spaced over the text",
                                "tokenizer": tokenizer_fingerprint(tokenizer)["sha256"]})
    return out


def evaluate(store: ArtifactStore, model: ModelInfo, packed: Ref | None, spec: EvalSpec, recipe: str,
             texts_sha256: dict[str, str] | None = None) -> Ref:
    """Perplexity of the PACKED model loaded back through from_pretrained (or of the base model when
    `packed` is None), plus size and effective bits from the bytes written. `texts_sha256` (from
    preflight) keys the stage by the evaluation texts' content."""
    path = store.materialize(packed) if packed is not None else Path(model.path)
    return store.put_json(evaluate_path(path, model, spec, recipe), kind="metrics")


def evaluate_path(path: Path, model: ModelInfo, spec: EvalSpec, recipe: str) -> dict:
    """Metrics (ARCHITECTURE.md schema) of the checkpoint directory `path`; `model` supplies the tokenizer
    and the compute setting (device, dtype). Perplexity and KL stream both models block by block
    (evaluation/streamed.py: one block of each in memory, the numbers of the whole loaded model); only the
    cloze tasks, off by default, load the whole packed model."""
    from ..compute import device_of, dtype_of, stage_compute
    from ..evaluation.streamed import streamable, streamed_kl, streamed_perplexity

    compute = stage_compute(model)
    device, dtype = device_of(compute), dtype_of(compute)
    stream = _seeded(_stream if streamable(path) else _whole, path, model.trust_remote_code, device, dtype)
    metrics = {"recipe": recipe, "uri": None, "perplexity": {}, "kl": {}, "accuracy": {}, "speed": {},
               "protocol": {"evaluation": {}}}
    protocols = eval_protocol(model, spec)
    total, done = sum(int(w.shape[0]) for w, _ in protocols.values()), 0
    for split, (windows, protocol) in protocols.items():
        result = streamed_perplexity(stream, windows, on_windows=lambda n, base=done: progress.report("evaluate", base + n, total))
        done += int(windows.shape[0])
        metrics["perplexity"][split] = round(result["perplexity"], 6)
        metrics["protocol"]["evaluation"][split] = protocol
    if spec.kl_windows and Path(path).resolve() != Path(model.path).resolve():
        base = _stream(Path(model.path), model.trust_remote_code, device, dtype)
        for split, (windows, _) in protocols.items():
            r = streamed_kl(stream, base, windows[:spec.kl_windows])
            metrics["kl"][split] = {"kl": round(r["kl"], 8), "top1_agreement": round(r["top1_agreement"], 6),
                                    "positions": r["positions"], "windows": min(spec.kl_windows, len(windows))}
    if spec.cloze_items:
        metrics["accuracy"] = cloze_accuracy(_seeded(_whole, path, model.trust_remote_code, device, dtype).net,
                                             model, spec)
    # Bits per weight of the ORIGINAL model's linears: a method that reshapes them (QUAD's expanded
    # inputs) pays for its extra stored columns instead of diluting them over a larger count.
    from ..evaluation.size import size_report

    metrics.update(size_report(path, target_linears(Path(model.path), model.trust_remote_code)))
    return metrics


def _stream(path: Path, trust_remote_code: bool, device, dtype):
    from ..evaluation.streamed import CheckpointStream

    return CheckpointStream(path, trust_remote_code, device, dtype)


def _whole(path: Path, trust_remote_code: bool, device, dtype: torch.dtype = torch.float32):
    from ..evaluation.streamed import WholeModel
    from ..models import load_model

    net = load_model(path, dtype, trust_remote_code).to(device)
    for module in net.modules():  # decode each packed weight once, not on every forward
        if hasattr(module, "cache_dequantized"):
            module.cache_dequantized = True
    return WholeModel(net)


@isolated_rng
def _seeded(load, *args):
    """`load(*args)` with a fixed seed (anything drawn while building the model is reproducible) on a
    forked generator (the caller's global one is left as it was)."""
    torch.manual_seed(0)
    return load(*args)


def cloze_accuracy(net, model: ModelInfo, spec: EvalSpec) -> dict:
    """Zero-shot cloze tasks built deterministically from held-out text (JSONL sha256 in the result)."""
    from ..calibration import load_text
    from ..evaluation.cloze import cloze_suite

    text = load_text(spec.cloze_split)
    tokenizer = load_tokenizer(Path(model.path), model.trust_remote_code)
    with tempfile.TemporaryDirectory() as tmp:
        results = cloze_suite(net, tokenizer, text.text, text.sha256, spec.cloze_items, spec.seed, Path(tmp))
    return {task: {k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()} | {"split": spec.cloze_split}
            for task, r in results.items()}
