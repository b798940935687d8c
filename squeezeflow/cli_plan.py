"""`squeezeflow plan MODEL --recipe R [--json]`: the stages a run would execute, each with its inputs
(the stages it waits on), its cache key and whether its output is already remembered in the store.
Nothing is computed: keys of stages whose inputs are not computed yet are shown as pending."""
from __future__ import annotations

import json


def cmd_plan(args, specs, print_json) -> int:
    from pathlib import Path

    from . import dag, memory_plan, pipeline
    from .models import load_config
    from .settings import store_uri
    from .terminal import safe_text

    from .cli import _compute

    model_ref, calib, evaluation = specs(args)
    jobs = [pipeline.preflight(model_ref, r, calib, evaluation, _compute(args), args.max_shard_size)
            for r in args.recipe.split(",")]
    memory = {j.recipe.name: memory_plan.plan(j, load_config(Path(j.model.path))) for j in jobs}
    stages = dag.plan(jobs, None if args.no_publish else "(registry)")
    rows = dag.probe(stages, args.store or store_uri())
    literal = {s.id: {k: _short(v) for k, v in s.inputs.items() if not dag._uses(v)} for s in stages}
    for row in rows:
        row["inputs"] = literal[row["id"]]
    if args.json:
        print_json({"model": jobs[0].model.key_form(), "recipes": [j.recipe.name for j in jobs], "stages": rows,
                    "memory": memory})
        return 0
    width = max(len(r["id"]) for r in rows)
    print(safe_text(f"{jobs[0].model.name} ({jobs[0].model.fingerprint[:12]}): {len(rows)} stages"))
    for r in rows:
        state = "cached" if r["cached"] else ("to run" if r["ready"] else "pending")
        after = f" after {', '.join(r['after'])}" if r["after"] and len(r["after"]) <= 3 else (
            f" after {len(r['after'])} stages" if r["after"] else "")
        key = (r["key"] or "-")[:28]
        print(safe_text(f"  {r['id']:<{width}}  {state:<7} {key:<28}{after}"))
    for name, m in memory.items():  # what a pod's memory request must cover (the preflight refuses above it)
        peak = m["peak"]
        need = m.get("device_peak_bytes", peak["bytes"])
        host = (f"; host ~{m['host_peak_bytes'] / 2**30:.1f} GiB, {m['host_limit_source']} "
                f"{m['host_limit_bytes'] / 2**30:.1f} GiB" if "host_peak_bytes" in m else "")
        print(safe_text(f"memory, {name}: peak ~{need / 2**30:.1f} GiB at {peak['stage']} ({peak['what']}); "
                        f"{m['limit_source']} {m['limit_bytes'] / 2**30:.1f} GiB{host}"))
    return 0


def _short(value):
    """A literal input as the plan shows it: specs as JSON, models by name and fingerprint."""
    if hasattr(value, "key_form"):
        form = value.key_form()
        return {k: form[k] for k in ("name", "fingerprint") if k in form} or "(job)"
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


def add_parser(sub, run_flags) -> None:
    p = sub.add_parser("plan", help="show the stages a compress run would execute and which are cached")
    p.add_argument("model")
    p.add_argument("--recipe", required=True, help="preset name(s), comma-separated, or a YAML file")
    p.add_argument("--no-publish", action="store_true", help="plan without the publish stage")
    run_flags(p)
    p.set_defaults(fn=lambda args: cmd_plan(args, _specs_of(), _json_printer()))


def _specs_of():
    from .cli import _specs

    return _specs


def _json_printer():
    from .cli import _print_json

    return _print_json
