"""Materialized trees: a store tree written out as a plain directory, trusted only while it is provably
unchanged.

Stages read models and artifacts as directories (`scratch/trees/<sha>`), and later stages and later
runs read the same directory again; a byte changed there would flow into a published artifact with a
fresh, self-consistent manifest. So a materialized tree is

- written read-only (files 0444): an editor or a stray script fails instead of changing it in use;
- recorded in a marker beside it (`<dir>.complete`): the tree's listing, whose sha256 must equal the
  tree's id, and for every file its size, mtime_ns, ctime_ns, inode and device right after writing;
- verified on every use: the set of files and directories must be exactly the tree's, every file's
  stats must equal the recorded ones, and a file whose stats differ is hashed in full. ctime cannot be
  set by a user (utime can restore mtime, nothing restores ctime), so an edit, a chmod or a file
  swapped in always forces the full hash. A tree that fails is rebuilt from the store's verified blobs.

The marker is bookkeeping in the same scratch directory: whoever can forge both a file and its marker
stats owns this machine's scratch space anyway; the store's blobs stay verified by hash on every read.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from .errors import StoreNotWritable

if TYPE_CHECKING:
    from .store import ArtifactStore, Ref

log = logging.getLogger(__name__)

MARKER_SUFFIX = ".complete"
MARKER_FORMAT = 2
FILE_MODE = 0o444
_SHA = re.compile(r"[0-9a-f]{64}")

# errno -> what it means for the directory we were writing to (the classes callers must not retry).
UNWRITABLE = {
    errno.EROFS: "is on a read-only file system",
    errno.EACCES: "is not writable (permission denied)",
    errno.EPERM: "is not writable (operation not permitted)",
    errno.ENOSPC: "is full (no space left on device)",
    errno.EDQUOT: "is over its disk quota",
}


@contextlib.contextmanager
def writing(where: str, setting: str) -> Iterator[None]:
    """Turn 'read-only / no permission / full' while writing `where` into one StoreNotWritable line
    (a BadInput: exit 2, never retried as transient); `setting` names how to point elsewhere."""
    try:
        yield
    except OSError as e:
        if e.errno not in UNWRITABLE:
            raise
        fix = ("free space and rerun: finished stages are reused" if e.errno in (errno.ENOSPC, errno.EDQUOT)
               else f"make it writable or choose another {setting}")
        raise StoreNotWritable(f"{where} {UNWRITABLE[e.errno]}; {fix}", e.errno) from None


SCRATCH_SETTING = "scratch directory (SQUEEZEFLOW_SCRATCH)"


def marker_path(dest: Path) -> Path:
    return dest.with_name(dest.name + MARKER_SUFFIX)   # beside the tree, so the tree holds only its files


def _stats(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _sha256_file(path: Path) -> str:
    from .store import sha256_file

    return sha256_file(path)


def read_marker(dest: Path) -> dict | None:
    """The marker's content when it is a well-formed format-2 marker whose listing hashes to its tree
    id, else None (an old or damaged marker only costs a full verification)."""
    from .store import canonical_json, sha256_bytes

    path = marker_path(dest)
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode) or os.lstat(path).st_size > 64 << 20:
            return None
        marker = json.loads(path.read_bytes())
        listing, files, sha = marker["listing"], marker["files"], marker["tree"]
        if marker.get("format") != MARKER_FORMAT or not isinstance(files, dict) or not isinstance(listing, dict):
            return None
        if not isinstance(sha, str) or sha256_bytes(canonical_json(listing)) != sha:
            return None
        return marker
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _walk(dest: Path) -> tuple[dict[str, os.stat_result], set[str]] | None:
    """Regular files (by relative path, with lstat) and directories under dest; None when dest is not
    a real directory or holds anything else (a symlink, a FIFO, a device)."""
    try:
        if not stat.S_ISDIR(os.lstat(dest).st_mode):
            return None
        files: dict[str, os.stat_result] = {}
        dirs: set[str] = set()
        stack = [(dest, "")]
        while stack:
            here, prefix = stack.pop()
            with os.scandir(here) as it:
                for entry in it:
                    rel = prefix + entry.name
                    st = entry.stat(follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode):
                        dirs.add(rel)
                        stack.append((Path(entry.path), rel + "/"))
                    elif stat.S_ISREG(st.st_mode):
                        files[rel] = st
                    else:
                        return None
        return files, dirs
    except OSError:
        return None


def verify(dest: Path, listing: dict[str, dict], recorded: dict) -> dict[str, list[int]] | None:
    """Fresh stats of every file when `dest` holds exactly the tree `listing` ({rel: Ref dict}), else
    None. Files whose stats match `recorded` are taken as unchanged; any other file is hashed."""
    found = _walk(dest)
    if found is None:
        return None
    files, dirs = found
    parents = {p.as_posix() for rel in listing for p in Path(rel).parents if p.as_posix() != "."}
    if set(files) != set(listing) or dirs != parents:
        return None
    out: dict[str, list[int]] = {}
    for rel, st in files.items():
        now, want = _stats(st), listing[rel]
        if recorded.get(rel) != now:
            if st.st_size != want["size"] or _sha256_file(dest / rel) != want["sha256"]:
                return None
        out[rel] = now
    return out


def write_marker(dest: Path, ref: "Ref", listing: dict, store_uri: str, files: dict) -> None:
    from .store import canonical_json

    path = marker_path(dest)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(canonical_json({"format": MARKER_FORMAT, "tree": ref.sha256, "kind": ref.kind,
                                    "size": ref.size, "store": store_uri, "listing": listing,
                                    "files": files}))
    os.replace(tmp, path)


def remove(path: Path) -> None:
    """Remove a file, a symlink or a tree, even one whose directories someone made read-only."""
    def make_writable_and_retry(func, p, _exc):
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), 0o755)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o755)
        func(p)

    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path, onerror=make_writable_and_retry)


@contextlib.contextmanager
def locked(dest: Path) -> Iterator[None]:
    """One materialization of a tree at a time across processes (Dask workers share scratch)."""
    try:
        import fcntl

        fd = os.open(dest.with_name(dest.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except (ImportError, OSError):
        yield   # no lock where none can be taken: verification still protects the reader
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def materialize(store: "ArtifactStore", ref: "Ref", dest: Path) -> Path:
    """`dest` holding exactly the tree `ref`: reused after verification, else rebuilt from the store."""
    where = f"scratch directory {dest.parent}"
    with writing(where, SCRATCH_SETTING):
        dest.parent.mkdir(parents=True, exist_ok=True)
    with locked(dest):
        marker = read_marker(dest)
        if marker is not None and marker["tree"] == ref.sha256:
            files = verify(dest, marker["listing"], marker["files"])
            if files is not None:
                if files != marker["files"]:  # same bytes, new stats (copied back, touched): remember them
                    with contextlib.suppress(OSError):
                        write_marker(dest, ref, marker["listing"], store.uri, files)
                return dest
            log.warning("materialized tree %s differs from store tree %s: rebuilding it from the store",
                        dest, ref.sha256[:12])
        elif dest.exists() or dest.is_symlink():
            # No usable marker (older format, damaged, another tree's): verify the bytes in full.
            listing = {rel: r.model_dump() for rel, r in store.get_tree(ref).items()}
            files = verify(dest, listing, {})
            if files is not None:
                with writing(where, SCRATCH_SETTING):
                    _make_read_only(dest, listing)
                    write_marker(dest, ref, listing, store.uri, _fresh_stats(dest, listing))
                return dest
        with writing(where, SCRATCH_SETTING):
            _rebuild(store, ref, dest)
    return dest


def _make_read_only(dest: Path, listing: dict) -> None:
    for rel in listing:
        if stat.S_IMODE(os.lstat(dest / rel).st_mode) != FILE_MODE:
            os.chmod(dest / rel, FILE_MODE)


def _fresh_stats(dest: Path, listing: dict) -> dict[str, list[int]]:
    return {rel: _stats(os.lstat(dest / rel)) for rel in listing}


def _rebuild(store: "ArtifactStore", ref: "Ref", dest: Path) -> None:
    tree = store.get_tree(ref)
    listing = {rel: r.model_dump() for rel, r in tree.items()}
    tmp = dest.with_name(f"{dest.name}.tmp{os.getpid()}")
    remove(tmp)
    tmp.mkdir()
    for rel, fref in tree.items():
        out = tmp / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        store._copy_out(fref, out)
        os.chmod(out, FILE_MODE)
    # No marker while the directory is swapped: a crash here leaves a tree that is verified in full.
    marker_path(dest).unlink(missing_ok=True)
    old = dest.with_name(f"{dest.name}.old{os.getpid()}")
    if dest.exists() or dest.is_symlink():
        remove(old)
        os.replace(dest, old)
    os.replace(tmp, dest)
    remove(old)
    # Stats taken after the rename (which keeps inodes): every copy was hash-checked as it was written.
    write_marker(dest, ref, listing, store.uri, _fresh_stats(dest, listing))


def checked_dir(given: str | os.PathLike):
    """`given`, verified first when it is a materialized tree (a marker beside it): a stage that got a
    directory from an earlier stage (a transformed or shallower model) re-checks it before reading,
    and a tree that was changed is rebuilt from the store it came from. Anything else (another
    directory, a hub model id) is returned exactly as given."""
    path = Path(given)
    if not marker_path(path).exists() and not (path.parent.name == "trees" and _SHA.fullmatch(path.name)):
        return given
    marker = read_marker(path)
    expected = path.name if _SHA.fullmatch(path.name) else (marker or {}).get("tree")
    if marker is not None and marker["tree"] == expected:
        files = verify(path, marker["listing"], marker["files"])
        if files is not None:
            return path
        store_uri = marker["store"]
    else:
        store_uri = None
    if expected is None:
        from .errors import IntegrityError

        raise IntegrityError(f"materialized tree {path} has a damaged marker and names no tree; delete it "
                             "and rerun (the stage that wrote it rebuilds it)")
    from .store import Ref, open_store

    store = open_store(store_uri)   # None: the configured store, where a run's trees come from
    ref = Ref(uri=f"sfs://{expected}", sha256=expected, size=(marker or {}).get("size", 0),
              kind=(marker or {}).get("kind", "tree"))
    return materialize(store, ref, path)
