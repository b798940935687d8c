"""Model fingerprints: the sha256 that identifies a model directory by the content of every file that
decides what the model computes or what an artifact built from it contains.

Covered: weights (`*.safetensors` and their index), `config.json`, `generation_config.json`, every
tokenizer file (tokenizer*, special_tokens*, added_tokens*, vocab*, merges*, chat_template*) and
model code (`*.py`, run only with trust_remote_code). A changed rms_norm_eps or rope_theta, a swapped
vocabulary or scaled weights each give another fingerprint, hence other cache keys.

Hashing a multi-GB checkpoint on every run is slow, so a record keeps each file's sha256 beside its
size, mtime_ns, ctime_ns, inode and device. A file is re-hashed whenever any of them differs (ctime
cannot be set by a user: an edit with the mtime put back still shows), and the fingerprint itself is
always recomputed from the per-file hashes, never read from the record. The record lives in the model
directory when it has one (prepared models), else in the scratch directory, keyed by the model's path;
a damaged record is ignored and rewritten, one that cannot be read at all is one BadInput line.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
from pathlib import Path

from .errors import BadInput
from .store import canonical_json, sha256_file

FINGERPRINT_FILE = "squeezeflow-fingerprint.json"
RECORD_FORMAT = 2
MAX_RECORD_BYTES = 16 << 20
CONTENT_FILES = re.compile(r".+\.safetensors|.+\.safetensors\.index\.json|config\.json|generation_config\.json"
                           r"|(tokenizer|special_tokens|added_tokens|vocab|merges|chat_template).*|.+\.py")
_SHA = re.compile(r"[0-9a-f]{64}")


def content_files(path: Path) -> list[str]:
    """Names of the files in `path` that the fingerprint covers (top level: HF directories are flat)."""
    names = []
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if entry.name == FINGERPRINT_FILE or not CONTENT_FILES.fullmatch(entry.name):
            continue
        try:
            st = os.stat(entry.path)   # follows symlinks: HF cache snapshots link into blobs/
        except OSError as e:
            raise BadInput(f"model file {entry.path} cannot be read ({e.strerror or e}: a dangling symlink "
                           "or a link loop?)") from None
        if stat.S_ISDIR(st.st_mode):
            continue
        if not stat.S_ISREG(st.st_mode):
            raise BadInput(f"model file {entry.path} is not a regular file")
        names.append(entry.name)
    return names


def fingerprint_of(hashes: dict[str, str]) -> str:
    """The fingerprint of a directory whose covered files have these sha256s."""
    h = hashlib.sha256(b"squeezeflow-fingerprint/2\n")
    for name, sha in sorted(hashes.items()):
        h.update(f"{name}:{sha}\n".encode())
    return h.hexdigest()


def record_path(path: Path) -> Path:
    """Where the record of `path` lives: in the directory when it has one, else in scratch."""
    inside = path / FINGERPRINT_FILE
    if os.path.lexists(inside):
        return inside
    from .settings import scratch_dir

    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
    return scratch_dir() / "fingerprints" / f"{key}.json"


def read_record(path: Path) -> dict:
    """The record's usable content ({} when absent or damaged); BadInput when it cannot be read at all."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise BadInput(f"fingerprint file {path} cannot be read ({e.strerror or e}); delete it") from None
    if not stat.S_ISREG(st.st_mode):   # a FIFO would block, /dev/zero would never end
        raise BadInput(f"fingerprint file {path} is not a regular file; delete it")
    if st.st_size > MAX_RECORD_BYTES:
        return {}
    try:
        record = json.loads(path.read_bytes())
    except PermissionError as e:
        raise BadInput(f"fingerprint file {path} cannot be read ({e.strerror}); delete it") from None
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _recorded_files(record: dict) -> dict[str, dict]:
    """{name: {"sha256", "stats"}} for the well-formed entries of a format-2 record."""
    files = record.get("files") if record.get("format") == RECORD_FORMAT else None
    if not isinstance(files, dict):
        return {}
    return {name: entry for name, entry in files.items()
            if isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and _SHA.fullmatch(entry["sha256"])
            and isinstance(entry.get("stats"), list) and len(entry["stats"]) == 5
            and all(type(x) is int for x in entry["stats"])}


def prepared_hashes(record: dict) -> dict[str, str]:
    """The hashes a prepared model had when it was prepared (format 1 records: the weights only)."""
    hashes = record.get("prepared") if record.get("format") == RECORD_FORMAT else record.get("files")
    if not isinstance(hashes, dict):
        return {}
    return {k: v for k, v in hashes.items() if isinstance(k, str) and isinstance(v, str) and _SHA.fullmatch(v)}


def _stats(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def fingerprint_files(path: Path, record_file: Path | None = None,
                      extra: dict | None = None) -> tuple[str, dict[str, str], dict]:
    """(fingerprint, {file name: sha256}, the record as now written) of the model directory `path`.
    Files whose stats match the record keep their recorded hash; the others are hashed. The record is
    rewritten when anything changed (silently skipped where it cannot be written: a read-only model
    directory only costs hashing again next time). `extra` adds fields to the record (prepare_model)."""
    path = Path(path)
    record_file = record_file or record_path(path)
    old = read_record(record_file)
    recorded = _recorded_files(old)
    files: dict[str, dict] = {}
    for name in content_files(path):
        st = os.stat(path / name)   # before hashing: a write during the hash changes ctime, seen next time
        entry = recorded.get(name)
        if entry is not None and entry["stats"] == _stats(st):
            files[name] = entry
        else:
            files[name] = {"sha256": sha256_file(path / name), "stats": _stats(st)}
    hashes = {name: entry["sha256"] for name, entry in files.items()}
    fingerprint = fingerprint_of(hashes)
    keep = {"source": old["source"]} if "source" in old else {}
    prepared = prepared_hashes(old)
    if prepared:
        if old.get("format") != RECORD_FORMAT:
            # A format-1 record hashed the weights only: the other files are taken as they are now.
            prepared = {**hashes, **prepared}
        keep["prepared"] = prepared
    new = {**keep, **(extra or {}), "format": RECORD_FORMAT, "fingerprint": fingerprint, "files": files}
    if new != old:
        _write_record(record_file, new)
    return fingerprint, hashes, new


def _write_record(record_file: Path, record: dict) -> None:
    tmp = record_file.with_name(f".{record_file.name}.tmp{os.getpid()}")
    try:
        record_file.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(canonical_json(record))
        os.replace(tmp, record_file)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def fingerprint_dir(path: Path) -> tuple[str, dict[str, str]]:
    """(fingerprint, {file name: sha256}) of a model directory, using and refreshing its record."""
    fingerprint, hashes, _ = fingerprint_files(Path(path))
    return fingerprint, hashes
