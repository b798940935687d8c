"""`squeezeflow recipes [--json]`: every preset the registered methods offer, with what each one needs.

Read from the method registry (squeezeflow.methods.registry), so a third-party method family registered
through the entry point appears here like the built-in ones: its examples as presets, its preset
parser's pattern as a family line.
"""
from __future__ import annotations

import json
import re
import sys


def _paragraph(doc: str | None) -> str:
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def _first_line(doc: str | None) -> str:
    """The docstring's first sentence (its first paragraph when that has no sentence end), on one line."""
    paragraph = _paragraph(doc)
    end = re.search(r"\.(\s|$)", paragraph)
    return paragraph[:end.start() + 1] if end else paragraph


def _bits(config) -> int | None:
    """Bits per stored weight code, None for pruning and layer removal (nothing is re-coded)."""
    if config.method in ("rf8", "fp8"):
        return 8  # the 8-bit float formats carry no `bits` field: the format fixes it
    if getattr(config, "bits", None) is not None:
        return config.bits
    base = getattr(config, "base", None)  # exp-Golomb storage of a base method's codes
    return _bits(base) if hasattr(base, "method") else None


def _step(config) -> dict:
    """One method of a recipe: name, bits, schedule and the statistics it reads."""
    from .methods.base import LayerRemoval
    from .methods.registry import get_method

    method = get_method(config)
    bits = _bits(config)
    if isinstance(method, LayerRemoval):
        schedule, needs = "layer removal", ["calibration windows"]
    else:
        schedule = method.schedule
        needs = [*method.statistics, *(f"{s} (dense model)" for s in method.dense_statistics)]
    return {"method": config.method, "bits": bits, "schedule": schedule, "statistics": needs,
            "description": _first_line(type(config).__doc__)}


def catalogue() -> dict:
    """{"presets": [...], "families": [...]}: each preset example resolved through the registry, and each
    registered family with its preset pattern (the parser's docstring)."""
    from .methods.registry import registrations
    from .recipes import PRESET_EXAMPLES, preset

    presets = []
    for name in PRESET_EXAMPLES:
        steps = [_step(c) for c in preset(name).methods]
        last = steps[-1]
        presets.append({"name": name, "method": "+".join(s["method"] for s in steps), "bits": last["bits"],
                        "schedule": last["schedule"],
                        "statistics": sorted({s for step in steps for s in step["statistics"]}),
                        "description": " then ".join(s["description"] for s in steps), "steps": steps})
    families = [{"method": reg.name, "pattern": _paragraph(getattr(reg.presets, "__doc__", None)),
                 "examples": list(reg.examples), "description": _first_line(reg.config.__doc__)}
                for reg in registrations().values()]
    return {"presets": presets, "families": families}


def cmd_recipes(args) -> int:
    cat = catalogue()
    if args.json:
        json.dump(cat, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
        return 0
    rows = [("preset", "method", "bits", "needs", "description")]
    for p in cat["presets"]:
        rows.append((p["name"], p["method"], "-" if p["bits"] is None else str(p["bits"]),
                     ", ".join(p["statistics"]) or "-", p["description"]))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
    print("\nfamilies (any preset matching the pattern works, not only the examples above):")
    for f in cat["families"]:
        print(f"  {f['method']}: {f['pattern'] or ', '.join(f['examples'])}")
    print("\nuse: squeezeflow compress MODEL --recipe PRESET[,PRESET] (or a recipe YAML file)")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("recipes", help="list every preset: method, bits, statistics it needs, description")
    p.set_defaults(fn=cmd_recipes)
