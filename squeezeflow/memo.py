"""The one place that builds cache keys and remembers stage results in the artifact store.

A key is sha256 over the stage's name, its version and its inputs in *key form* (content, never paths):
a Ref is its sha256, a model is its fingerprint, specs are their JSON. Results are stored as JSON in the
store under that key (`store.put_index`), so a rerun — after a crash, SIGKILL or SIGTERM, in any process —
finds every finished stage there, and nothing is ever unpickled. Bump a stage's version when its output for
the same inputs changes.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, TypeVar

from pydantic import BaseModel, TypeAdapter

from .store import ArtifactStore, Ref, canonical_json, sha256_bytes

STAGE_VERSIONS = {"calibrate": "2", "statistics": "1", "transform": "1", "restructure": "1", "compress": "3",
                  "pack": "3", "tune": "1", "evaluate": "4", "assemble": "6"}

T = TypeVar("T")


def key_form(value: Any) -> Any:
    """`value` as the content that identifies it: objects define `key_form()` (a model drops its local
    path), other pydantic models are their JSON, containers recurse."""
    if hasattr(value, "key_form"):
        return value.key_form()
    if isinstance(value, Ref):
        return value.sha256
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(k): key_form(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [key_form(v) for v in value]
    if isinstance(value, Path):
        raise TypeError("a path is no cache key: key a file by its content")
    return value


def stage_key(stage: str, inputs: dict[str, Any]) -> str:
    return f"{stage}-" + sha256_bytes(canonical_json({"stage": stage, "version": STAGE_VERSIONS[stage],
                                                      "inputs": key_form(inputs)}))


def lookup(store: ArtifactStore, key: str, out_type: Any) -> Any | None:
    """The remembered result under `key`, validated as `out_type`, or None."""
    ref = store.get_index(key)
    if ref is None:
        return None
    try:
        return TypeAdapter(out_type).validate_python(store.get_json(ref))
    except (ValueError, UnicodeDecodeError) as e:  # JSON or schema: never any other decoder (no pickle)
        from .errors import IntegrityError

        raise IntegrityError(f"the stored result of stage {key[:40]}… is not what that stage writes "
                             f"({type(e).__name__}); remove the store's index entry {key!r} to recompute it") from None


def remember(store: ArtifactStore, key: str, out_type: Any, value: Any) -> None:
    data = TypeAdapter(out_type).dump_python(value, mode="json")
    store.put_index(key, store.put_json(data, kind="stage-result"))


def remembered(store: ArtifactStore, key: str, out_type: type[T], compute: Callable[[], T]) -> tuple[T, bool]:
    """(result, was it remembered): `compute()` runs only when nothing is stored under `key`."""
    found = lookup(store, key, out_type)
    if found is not None:
        return found, True
    value = compute()
    remember(store, key, out_type, value)
    return value, False


def stored_dir(store: ArtifactStore, key: str, kind: str, build: Callable[[Path], None]) -> Ref:
    """The directory stored under index `key`; `build(out_dir)` writes it the first time."""
    ref = store.get_index(key)
    if ref is None:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / kind
            build(out)
            ref = store.put_dir(out, kind=kind)
        store.put_index(key, ref)
    return ref
