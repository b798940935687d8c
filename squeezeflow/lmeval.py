"""lm-evaluation-harness tasks on a packed artifact (`squeezeflow eval ARTIFACT --lm-eval TASKS`).

The artifact is loaded with `squeezeflow.load` (any packed format: the quantizer registered with
transformers builds its modules) and handed to lm-eval's HFLM wrapper as a ready model, so lm-eval never
resolves the checkpoint itself (a plain `lm_eval --model hf` does not know the `squeezeflow` quant method).
lm-eval is an optional dependency (`pip install 'squeezeflow[lmeval]'`); without it, one BadInput line.
"""
from __future__ import annotations

import math
from pathlib import Path

from .errors import BadInput

INSTALL_HINT = "pip install 'squeezeflow[lmeval]' (or: pip install lm_eval)"


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise BadInput(f"--lm-eval needs lm-evaluation-harness, which is not installed ({e.name or e}): "
                       f"{INSTALL_HINT}") from None
    return lm_eval, HFLM, TaskManager


def parse_tasks(value: str) -> list[str]:
    tasks = list(dict.fromkeys(t.strip() for t in value.split(",") if t.strip()))
    if not tasks:
        raise BadInput("--lm-eval needs at least one task name (comma-separated), e.g. --lm-eval hellaswag")
    return tasks


def task_manager(include: str | None, tasks: list[str] = ()):
    """lm-eval's task index, with the task YAMLs under `include` added (checked to exist first). When every
    one of `tasks` is defined under `include`, only that directory is indexed: indexing lm-eval's own
    thousands of task files takes many seconds."""
    _, _, TaskManager = _lm_eval()
    if include is None:
        return TaskManager()
    if not Path(include).expanduser().is_dir():
        raise BadInput(f"--lm-eval-include {include!r} is not a directory of lm-eval task YAML files")
    include = str(Path(include).expanduser())
    local = TaskManager(include_path=include, include_defaults=False)
    if tasks and all(t in local.all_tasks for t in tasks):
        return local
    return TaskManager(include_path=include)


def check_tasks(tasks: list[str], manager) -> None:
    """Every task name lm-eval knows (a task, group or tag), else one line naming those it does not."""
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise BadInput(f"lm-eval does not know the task(s) {', '.join(unknown)}; list them with "
                       "`lm_eval ls tasks`, or add a task YAML directory with --lm-eval-include")


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def run(path: Path, tasks: list[str], include: str | None = None, limit: int | None = None,
        num_fewshot: int | None = None, batch_size: int = 1, seed: int = 0, manager=None) -> dict:
    """lm-eval's results for `tasks` on the artifact directory `path`: per task its metrics
    ({"acc,none": ..., "acc_stderr,none": ...}), plus versions, n-shot and the settings used. `manager`:
    a task_manager(include) already built (indexing every lm-eval task takes seconds)."""
    import squeezeflow

    lm_eval, HFLM, _ = _lm_eval()
    if manager is None:
        manager = task_manager(include)
    check_tasks(tasks, manager)
    model, tokenizer = squeezeflow.load(str(path), tokenizer=True)
    for module in model.modules():  # decode each packed weight once, not on every forward
        if hasattr(module, "cache_dequantized"):
            module.cache_dequantized = True
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                  num_fewshot=num_fewshot, random_seed=seed, numpy_random_seed=seed,
                                  torch_random_seed=seed, fewshot_random_seed=seed, log_samples=False)
    if out is None:  # simple_evaluate returns None on non-zero ranks only; one process here
        raise RuntimeError("lm-eval returned no results")
    results = {task: {k: _jsonable(v) for k, v in metrics.items()} for task, metrics in out["results"].items()}
    return {"tasks": tasks, "results": results, "versions": {k: _jsonable(v) for k, v in out.get("versions", {}).items()},
            "n-shot": {k: _jsonable(v) for k, v in out.get("n-shot", {}).items()},
            "settings": {"limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size, "seed": seed,
                         "include": str(include) if include else None},
            "lm_eval_version": getattr(lm_eval, "__version__", None)}


def summary_lines(report: dict) -> list[str]:
    """One line per task: its metrics (stderr omitted), for the terminal."""
    lines = []
    for task, metrics in report["results"].items():
        shown = [f"{k.split(',')[0]} {v:.4f}" for k, v in metrics.items()
                 if isinstance(v, float) and "stderr" not in k]
        lines.append(f"lm-eval {task}: " + (", ".join(shown) or "no numeric metric"))
    return lines
