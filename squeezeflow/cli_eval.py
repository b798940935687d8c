"""`squeezeflow eval ARTIFACT`: re-evaluate an artifact with the protocol recorded in its manifest."""
from __future__ import annotations

from pathlib import Path

from .cli import _print_json
from .errors import BadInput


def _local_base(manifest: dict) -> Path | None:
    """The artifact's base model, if its ModelRef resolves on this machine (for KL and speed ratios)."""
    from .models import resolve_model

    try:
        base = resolve_model(manifest["lineage"]["model"]["ref"])
    except (BadInput, KeyError, OSError):
        return None
    return base.path if base.fingerprint == manifest["lineage"]["model"]["fingerprint"] else None


def cmd_eval(args) -> int:
    """Re-evaluate a published (or local) artifact with the protocol recorded in its manifest."""
    from . import pipeline
    from .config import EvalSpec
    from .models import pull_artifact
    from .registry import verify_dir

    path = Path(args.artifact) if Path(args.artifact).is_dir() else pull_artifact(args.artifact)
    manifest = verify_dir(path)
    recorded = manifest["metrics"]
    protocols = recorded["protocol"]["evaluation"]
    first = next(iter(protocols.values()))
    spec = EvalSpec(splits=tuple(protocols), seqlen=first["seqlen"],
                    max_windows=args.eval_windows or max(p["windows"] for p in protocols.values()),
                    kl_windows=args.kl_windows, cloze_items=args.cloze_items)
    base = _local_base(manifest)
    info = pipeline.ModelInfo(ref=args.artifact, name=manifest["model"], path=str(base or path), fingerprint="-",
                              num_layers=0)
    metrics = pipeline.evaluate_path(path, info, spec, manifest["recipe"])
    if args.speed:
        if base is None:
            raise BadInput("--speed needs the base model on this machine (its ModelRef did not resolve)")
        from .evaluation.speed import speed_ratios
        from .models import load_model

        net = load_model(path)
        for m in net.modules():
            if hasattr(m, "cache_dequantized"):
                m.cache_dequantized = True
        metrics["speed"] = speed_ratios(net, load_model(base))
    metrics["uri"] = args.artifact
    if args.json:
        _print_json({"results": [metrics], "recorded": recorded})
    else:
        for split, ppl in metrics["perplexity"].items():
            print(f"{split}: perplexity {ppl:.4f} (recorded {recorded['perplexity'].get(split, float('nan')):.4f})")
        print(f"bits/weight {metrics['bits_per_weight']:.3f}, size {metrics['size_bytes'] / 2**20:.1f} MiB")
    return 0
