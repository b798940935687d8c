"""Artifact manifests: their shape, their identity, and the verification of local artifact directories.

Every message that quotes something read from a manifest (file names, fields) escapes it with
`safe_text`: a planted manifest must not be able to write escape sequences to the user's terminal.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import BadInput, IntegrityError, UntrustedEntry
from .signing import SIGNATURE, TrustPolicy
from .store import canonical_json, sha256_file
from .terminal import safe_text

MANIFEST = "manifest.json"
METRICS_FILE = "report/metrics.json"
# The artifact store marks materialized directories with the first file; it is bookkeeping, not content.
# The signature sits beside the manifest (it signs the manifest, so the manifest cannot list it).
IGNORED_FILES = frozenset({".squeezeflow-complete"})
NOT_CONTENT = frozenset({MANIFEST, SIGNATURE})
# ':' is allowed for recipe names such as nowag-p2:4 (N:M pruning); it is a plain character in S3 keys.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+:-]{0,127}$")


@dataclass(frozen=True)
class Entry:
    uri: str
    model: str
    recipe: str
    artifact_id: str


def check_name(label: str, name: str) -> None:
    """BadInput unless `name` can be a registry model/recipe/alias name."""
    if not isinstance(name, str) or not NAME.match(name):
        raise BadInput(f"invalid {label} {safe_text(repr(name))}: use letters, digits and . _ + : - "
                       "(no slashes, at most 128)")


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Parse and sanity-check `path/manifest.json` (structure only, no hashing)."""
    mpath = Path(path) / MANIFEST
    if not mpath.is_file():
        raise BadInput(f"{safe_text(path)} is not an artifact directory: it has no {MANIFEST}")
    return parse_manifest(mpath.read_bytes(), safe_text(mpath))


def parse_manifest(data: bytes, where: str) -> dict[str, Any]:
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise IntegrityError(f"{where} is not valid JSON ({safe_text(e)})") from None
    check_manifest_shape(manifest, where)
    return manifest


def content_id(files: dict, lineage: dict) -> str:
    """An artifact's id: a hash of every file's sha256 and size and of its lineage. Identical runs give
    identical ids, and a manifest edited in any of those fields no longer matches its own id."""
    return hashlib.sha256(canonical_json({"files": files, "lineage": lineage})).hexdigest()[:16]


def check_identity(manifest: dict, where: str, entry: Entry | None = None) -> None:
    """The manifest names itself truthfully: its artifact_id is the content id of its files and lineage,
    its model and recipe are the lineage's, and, when it came from a registry entry, the entry it was read
    from has that id, model and recipe. This catches a manifest edited to list other files or to pass for
    another entry. (A content id is not a signature: whoever can write the registry can also write a new,
    self-consistent entry; signatures (signing.py) guard against that.)"""
    lineage = manifest.get("lineage")
    if not isinstance(manifest.get("artifact_id"), str) or not isinstance(lineage, dict):
        raise UntrustedEntry(f"{where}: manifest has no artifact_id/lineage, so its content cannot be "
                             "authenticated; only artifacts written by squeezeflow's pipeline load")
    expected = content_id(manifest["files"], lineage)
    if manifest["artifact_id"] != expected:
        raise UntrustedEntry(f"{where}: manifest was modified: its artifact_id {safe_text(manifest['artifact_id'])} "
                             f"is not the content id {expected} of the files and lineage it lists")
    for name in ("model", "recipe"):
        recorded = (lineage.get(name) or {}).get("name") if isinstance(lineage.get(name), dict) else None
        if manifest.get(name) != recorded:
            raise UntrustedEntry(f"{where}: manifest was modified: {name} {safe_text(repr(manifest.get(name)))} "
                                 f"is not the lineage's {safe_text(repr(recorded))}")
    if entry is not None:
        for name, value in (("artifact_id", entry.artifact_id), ("model", entry.model), ("recipe", entry.recipe)):
            if manifest.get(name) != value:
                raise UntrustedEntry(f"{where}: manifest says {name} {safe_text(repr(manifest.get(name)))} but "
                                     f"it was read from {entry.uri} ({name} {value!r}): it points elsewhere")


def verify_dir(path: str | os.PathLike, authenticate: bool = True, trust: TrustPolicy | None = None) -> dict[str, Any]:
    """Check a local artifact directory against its manifest; return the manifest.

    Every listed file must exist with the recorded size and sha256, and no unlisted file may exist
    (besides manifest.json and its signature). With `authenticate` (the default, and what every loader
    uses) the manifest must also carry its content id (see check_identity). With `trust`, its signature
    (manifest.sig) is checked against the trusted keys. Raises IntegrityError naming the first offending
    file.
    """
    root = Path(path)
    manifest = read_manifest(root)
    files = manifest["files"]
    for rel, meta in sorted(files.items()):
        f, shown = root / rel, safe_text(rel)
        if not f.is_file():
            raise IntegrityError(f"{shown}: listed in the manifest but missing from {safe_text(root)}")
        if f.stat().st_size != meta["size"]:
            raise IntegrityError(f"{shown}: size {f.stat().st_size} != manifest {meta['size']} in {safe_text(root)}")
        if sha256_file(f) != meta["sha256"]:
            raise IntegrityError(f"{shown}: sha256 does not match the manifest in {safe_text(root)} "
                                 "(corrupted or modified)")
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root).as_posix()
        if f.is_file() and rel not in NOT_CONTENT and rel not in files and f.name not in IGNORED_FILES:
            raise IntegrityError(f"{safe_text(rel)}: present in {safe_text(root)} but not listed in its manifest")
    if authenticate:
        authenticate_dir(root, manifest)
    if trust is not None:
        sig = root / SIGNATURE
        trust.check((root / MANIFEST).read_bytes(), sig.read_bytes() if sig.is_file() else None,
                    safe_text(root))
    return manifest


def authenticate_dir(root: Path, manifest: dict, where: str | None = None) -> None:
    """What a loader needs beyond matching hashes: no pickles, a true content id, and metrics that are
    the ones in the report whose hash the manifest lists. (Files are assumed hashed already.)"""
    where = where or safe_text(root / MANIFEST)
    files = manifest["files"]
    for rel in sorted(files):
        refuse_pickle(root / rel, rel)
    check_identity(manifest, where)
    results = _recorded_results(root) if METRICS_FILE in files else None
    if results and (manifest.get("metrics") != results[-1] or manifest.get("baseline") != results[0]):
        raise UntrustedEntry(f"{where}: manifest was modified: its metrics differ from {METRICS_FILE}, "
                             "whose hash it lists")


def _recorded_results(root: Path) -> list | None:
    try:
        results = json.loads((root / METRICS_FILE).read_bytes()).get("results")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, RecursionError) as e:
        raise IntegrityError(f"{METRICS_FILE} in {safe_text(root)} is not a metrics document ({safe_text(e)})") from None
    return results if isinstance(results, list) and len(results) >= 1 else None


# Pickle-based weight files, refused by name and by content: unpickling runs arbitrary code. Files in
# formats whose readers never unpickle (safetensors, JSON, text, PNG) are not sniffed: a safetensors
# header length can begin with the same bytes as a pickle.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".joblib")
SAFE_SUFFIXES = (".safetensors", ".json", ".md", ".txt", ".png", ".jinja", ".csv")


def refuse_pickle(path: Path, rel: str) -> None:
    suffix = path.suffix.lower()
    if suffix in SAFE_SUFFIXES:
        return
    with open(path, "rb") as f:
        head = f.read(4)
    # protocol 2+ pickles start with 0x80 <proto>; torch.save archives are zip files holding a pickle
    if suffix in PICKLE_SUFFIXES or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5) \
            or head == b"PK\x03\x04":
        raise IntegrityError(f"{safe_text(rel)}: a pickle or torch.save archive; squeezeflow never loads pickled "
                             "data (weights must be safetensors)")


def check_manifest_shape(manifest: Any, where: str) -> None:
    """A manifest lists its files by plain relative POSIX paths (printable characters only, nothing
    that climbs out of the directory or aliases another spelling), each with a sha256 and a size."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise IntegrityError(f"{where}: manifest has no 'files' mapping")
    for rel, meta in manifest["files"].items():
        parts = PurePosixPath(rel).parts
        if (not rel.isprintable() or "\\" in rel or rel.startswith("/") or ".." in parts or not parts
                or PurePosixPath(rel).as_posix() != rel or rel in NOT_CONTENT):
            raise IntegrityError(f"{where}: illegal file path in manifest: {safe_text(repr(rel))}")
        size = meta.get("size") if isinstance(meta, dict) else None
        if not (isinstance(size, int) and not isinstance(size, bool) and size >= 0
                and re.fullmatch(r"[0-9a-f]{64}", str(meta.get("sha256", "")))):
            raise IntegrityError(f"{where}: manifest entry for {safe_text(repr(rel))} needs a sha256 (hex) and "
                                 "an int size")
    dirs = {str(parent) for rel in manifest["files"] for parent in PurePosixPath(rel).parents}
    clash = sorted(dirs & set(manifest["files"]))
    if clash:
        raise IntegrityError(f"{where}: manifest lists {safe_text(repr(clash[0]))} both as a file and as a directory")
