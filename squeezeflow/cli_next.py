"""What a `squeezeflow compress` run prints after its table: where the artifact is on this machine and the
commands that use it next, with the real paths and URIs filled in (a run should never end on a bare
s3:// address of an embedded server). Also --eval's parsing, shared by compress, sweep, plan and eval."""
from __future__ import annotations

import shlex
from pathlib import Path

from .errors import BadInput


def eval_sources(value: str | None) -> tuple[str, ...] | None:
    """--eval's comma-separated sources (None: the default splits). An existing local path is made absolute,
    so the split name recorded in the manifest still finds the text when `squeezeflow eval` or the nightly
    gate re-reads it from another directory."""
    if value is None:
        return None
    sources = [v.strip() for v in value.split(",") if v.strip()]
    if not sources:
        raise BadInput("--eval needs at least one source: a named split, a .txt/.jsonl file or directory, "
                       "or an s3:// prefix")
    return tuple(dict.fromkeys(s if s.startswith("s3://") or not Path(s).expanduser().exists()
                               else str(Path(s).expanduser().resolve()) for s in sources))


def next_steps(result: dict, store: str | None) -> list[str]:
    """Lines for one run's result (flows/compress.py's return value): the materialized local copy, then
    pull / load / export / eval commands for it."""
    from .store import Ref, open_store

    artifact = result["artifact"]
    recipe = result["results"][1]["recipe"]
    local = open_store(store or None).materialize(Ref(**artifact["store_ref"]))
    uri = artifact.get("uri")
    ref = uri or str(local)
    q = shlex.quote
    lines = [f"{recipe}: {uri or '(not published)'}", f"  local copy: {local}", "  next:"]
    if uri:
        lines.append(f"    squeezeflow registry pull {q(uri)} --dest ./{recipe}")
    load = f"import squeezeflow; model = squeezeflow.load({ref!r})"
    # Double quotes read best; shlex's quoting when the path holds something the shell would expand.
    load = f'"{load}"' if not any(c in load for c in '"$`\\!') else q(load)
    lines += [f"    python -c {load}",
              f"    squeezeflow export {q(ref)} --dest ./{recipe}-export",
              f"    squeezeflow eval {q(ref)}"]
    return lines


def print_next_steps(results: list[dict], store: str | None) -> None:
    for r in results:
        print()
        print("\n".join(next_steps(r, store)))
