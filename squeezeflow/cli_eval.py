"""`squeezeflow eval ARTIFACT`: re-evaluate an artifact with the protocol recorded in its manifest, on other
text (--eval) and with lm-evaluation-harness tasks (--lm-eval)."""
from __future__ import annotations

from pathlib import Path

from .cli import _print_json
from .cli_next import eval_sources
from .errors import BadInput
from .strict_types import int_in


def add_eval_flags(ev) -> None:
    """The eval command's flags beyond its recorded protocol: other text, lm-eval tasks."""
    ev.add_argument("--eval", help="evaluate on these sources instead of the recorded splits (comma-separated: named "
                                   "split, .txt/.jsonl file or dir, s3:// prefix)")
    ev.add_argument("--lm-eval", metavar="TASKS", help="lm-evaluation-harness tasks, comma-separated (needs lm_eval)")
    ev.add_argument("--lm-eval-include", metavar="DIR", help="a directory of extra lm-eval task YAML files")
    ev.add_argument("--lm-eval-limit", type=int_in(1, 10_000_000), help="at most this many documents per task")
    ev.add_argument("--lm-eval-fewshot", type=int_in(0, 1000), help="few-shot examples per prompt (default: the task's)")


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

    tasks = manager = None
    if args.lm_eval is not None:  # lm-eval installed, tasks known: checked before any heavy work
        from . import lmeval

        tasks = lmeval.parse_tasks(args.lm_eval)
        manager = lmeval.task_manager(args.lm_eval_include, tasks)
        lmeval.check_tasks(tasks, manager)
    path = Path(args.artifact) if Path(args.artifact).is_dir() else pull_artifact(args.artifact)
    manifest = verify_dir(path)
    recorded = manifest["metrics"]
    protocols = recorded["protocol"]["evaluation"]
    first = next(iter(protocols.values()))
    splits = eval_sources(args.eval) or tuple(protocols)
    if args.eval:  # every source readable, or one line naming it, before the model loads
        from .calibration import load_text

        for split in splits:
            load_text(split, "evaluation source")
    spec = EvalSpec(splits=splits, seqlen=first["seqlen"],
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
    if tasks:
        from . import lmeval

        metrics["lm_eval"] = lmeval.run(path, tasks, args.lm_eval_include, args.lm_eval_limit, args.lm_eval_fewshot,
                                        manager=manager)
    metrics["uri"] = args.artifact
    if args.json:
        _print_json({"results": [metrics], "recorded": recorded})
    else:
        from .evaluation.report import split_label

        for split, ppl in metrics["perplexity"].items():
            was = recorded["perplexity"].get(split)
            print(f"{split_label(split)}: perplexity {ppl:.4f} "
                  + (f"(recorded {was:.4f})" if was is not None else f"(not in the manifest: {split})"))
        print(f"bits/weight {metrics['bits_per_weight']:.3f}, size {metrics['size_bytes'] / 2**20:.1f} MiB")
        if tasks:
            from .lmeval import summary_lines

            print("\n".join(summary_lines(metrics["lm_eval"])))
    return 0
