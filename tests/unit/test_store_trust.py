"""Materialized store trees are trusted only while provably unchanged, and a store that refuses writes
is one clear, non-transient error.

A tree written out of the store (scratch/trees/<sha>) is read by later stages and later runs; whatever
is changed there (a flipped byte with its mtime put back, a swapped or planted file, a symlink) must
never reach an assembled artifact: the next use finds it and rebuilds the tree from the store's blobs.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from squeezeflow import pipeline, trees
from squeezeflow.config import CalibrationSpec, EvalSpec, ModelRef
from squeezeflow.errors import BadInput, StoreNotWritable
from squeezeflow.models import LayerStream, load_config
from squeezeflow.store import LocalStore, sha256_file
from sf_testing import run_stages, tally


@pytest.fixture()
def tree(tmp_path):
    store = LocalStore(tmp_path / "store")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(bytes(range(256)) * 64)
    (src / "sub" / "b.json").write_text('{"x": 1}\n')
    return store, store.put_dir(src), src


def _contents(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _writable(path: Path) -> Path:
    os.chmod(path, 0o644)   # what anyone who means to change a file does first (root needs nothing)
    return path


def _flip_in_place(path: Path) -> None:
    st = os.stat(path)
    with open(_writable(path), "r+b") as f:
        f.seek(st.st_size // 2)
        byte = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([byte[0] ^ 1]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))   # size, inode and mtime all as recorded


def _replace(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.unlink()
    path.write_bytes(bytes(data))


def _symlink_to_copy(path: Path) -> None:
    copy = path.parent.parent / f"outside-{path.name}"
    shutil.copyfile(path, copy)
    path.unlink()
    path.symlink_to(copy)


def _other_tree_marker(path: Path) -> None:
    marker = trees.marker_path(path)
    data = json.loads(marker.read_text())
    data["files"]["a.bin"][1] += 1   # recorded stats no longer match: forces the full check
    marker.write_text(json.dumps(data))
    _replace(path / "a.bin")


TAMPERING = {
    "byte flipped in place, mtime put back": lambda d: _flip_in_place(d / "a.bin"),
    "file replaced": lambda d: _replace(d / "sub" / "b.json"),
    "file truncated": lambda d: _writable(d / "a.bin").write_bytes(b""),
    "file deleted": lambda d: (d / "a.bin").unlink(),
    "file planted": lambda d: (d / "evil.py").write_text("import os\n"),
    "directory planted": lambda d: (d / "extra").mkdir(),
    "file swapped for a symlink": lambda d: _symlink_to_copy(d / "a.bin"),
    "marker stats edited and file replaced": _other_tree_marker,
    "marker deleted and file replaced": lambda d: (trees.marker_path(d).unlink(), _replace(d / "a.bin")),
    "marker garbage and file flipped": lambda d: (trees.marker_path(d).write_text("{"), _flip_in_place(d / "a.bin")),
}


def test_materialized_files_are_read_only(tree):
    store, ref, src = tree
    out = store.materialize(ref)
    assert _contents(out) == _contents(src)
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()} == {0o444}
    assert out.parent.name == "trees" and out.name == ref.sha256


@pytest.mark.parametrize("how", list(TAMPERING))
def test_a_changed_materialized_tree_is_rebuilt_on_use(how, tree):
    store, ref, src = tree
    out = store.materialize(ref)
    TAMPERING[how](out)
    assert _contents(out) != _contents(src) or how.startswith("directory") or "symlink" in how
    again = store.materialize(ref)
    ok = again == out and _contents(again) == _contents(src) and not any(p.is_symlink() for p in again.rglob("*")) \
        and sorted(p.relative_to(again).as_posix() for p in again.rglob("*")) == ["a.bin", "sub", "sub/b.json"]
    tally("tampering refused", ok)
    assert ok, how


def test_an_unchanged_tree_is_not_hashed_again(tree, monkeypatch):
    store, ref, _ = tree
    out = store.materialize(ref)
    hashed = []
    real = trees._sha256_file
    monkeypatch.setattr(trees, "_sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    assert store.materialize(ref) == out and hashed == []
    os.utime(out / "a.bin")   # same bytes, new stats: hashed once, kept, stats remembered
    inode = os.stat(out / "a.bin").st_ino
    assert store.materialize(ref) == out and hashed == ["a.bin"] and os.stat(out / "a.bin").st_ino == inode
    assert store.materialize(ref) == out and hashed == ["a.bin"]


def test_a_tree_with_an_old_marker_is_verified_in_full(tree):
    store, ref, src = tree
    out = store.materialize(ref)
    trees.marker_path(out).write_text(ref.sha256)   # the marker format before verification existed
    inode = os.stat(out / "a.bin").st_ino
    assert store.materialize(ref) == out and os.stat(out / "a.bin").st_ino == inode   # intact: kept
    assert json.loads(trees.marker_path(out).read_text())["tree"] == ref.sha256      # marker upgraded
    trees.marker_path(out).write_text(ref.sha256)
    _replace(out / "a.bin")
    assert _contents(store.materialize(ref)) == _contents(src)


def test_a_model_directory_from_the_store_is_checked_by_every_loader(tiny_model, tmp_path):
    """Stages after `transform` / `restructure` get only a path into scratch/trees; every loader
    (config, tokenizer, LayerStream, whole model) re-checks it and rebuilds a changed one."""
    store = LocalStore(tmp_path / "store")
    ref = store.put_dir(tiny_model, kind="transformed-model")
    path = store.materialize(ref)
    true_eps = load_config(path).rms_norm_eps
    config = json.loads((path / "config.json").read_text())
    config["rms_norm_eps"] = 0.5
    _writable(path / "config.json").write_text(json.dumps(config))
    assert load_config(path).rms_norm_eps == true_eps
    _flip_in_place(path / "model.safetensors")
    stream = LayerStream(path)
    ok = sha256_file(path / "model.safetensors") == store.get_tree(ref)["model.safetensors"].sha256
    tally("tampering refused", ok and stream.config.rms_norm_eps == true_eps)
    assert ok


def test_checked_dir_leaves_everything_else_as_given(tiny_model):
    assert trees.checked_dir(tiny_model) is tiny_model
    assert trees.checked_dir("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"   # a hub id stays a str


def test_assemble_publishes_the_stored_bytes_not_a_changed_tree(tiny_model, tmp_path):
    """The reported case: bytes changed in the materialized packed tree went into the artifact."""
    store = LocalStore(tmp_path / "store")
    plan = pipeline.preflight(ModelRef(ref=str(tiny_model)), "rtn-w4g32",
                              CalibrationSpec(n_samples=4, seqlen=32, seed=0),
                              EvalSpec(seqlen=32, max_windows=2, kl_windows=0))
    r = run_stages(store, plan, base=False)
    packed_dir = store.materialize(r["packed"])
    _flip_in_place(packed_dir / "model.safetensors")
    artifact = pipeline.assemble(store, plan, r["calib"], r["stats"], r["blocks"], r["packed"], r["metrics"],
                                 r["metrics"])
    files, before = store.get_tree(artifact), store.get_tree(r["artifact"])
    # Every packed file, as first assembled (the lineage may differ: it names the code's git commit).
    ok = all(files[rel] == before[rel] for rel in store.get_tree(r["packed"]))
    tally("tampering refused", ok)
    assert ok


# --- a store that refuses writes --------------------------------------------------------------------
SCRIPT = textwrap.dedent("""
    import json, os, sys
    from squeezeflow.errors import StoreNotWritable
    from squeezeflow.store import LocalStore

    root, mode = sys.argv[1], sys.argv[2]
    store = LocalStore(os.path.join(root, "store"))
    small = store.put_bytes(b"kept", "blob")
    tree = store.put_tree({"f": small})
    if mode == "ro":
        os.system(f"mount -o remount,ro {root}")
    out = {}
    for what, write in {"object": lambda: store.put_bytes(os.urandom(1 << 20), "blob"),
                        "index": lambda: store.put_index("k", small),
                        "tree": lambda: store.materialize(tree, os.path.join(root, "trees", "t"))}.items():
        try:
            write()
            out[what] = None
        except StoreNotWritable as e:
            out[what] = [e.errno, str(e)]
    out["leftovers"] = [n for _, _, names in os.walk(root) for n in names if ".tmp" in n]
    out["readable"] = store.get_bytes(small).decode()
    print(json.dumps(out))
""")


def _in_small_mount(mode: str, tmp_path: Path) -> dict:
    """Run SCRIPT in a private mount namespace on a 512 KiB tmpfs: a real full or read-only disk."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("needs unshare with user namespaces to mount a small file system")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cmd = f"mount -t tmpfs -o size=512k tmpfs {mnt} && exec {sys.executable} -c \"$0\" {mnt} {mode}"
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", cmd, SCRIPT], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, SQUEEZEFLOW_SCRATCH=str(mnt / "scratch")))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode,errno_name,words", [("full", "ENOSPC", "is full"), ("ro", "EROFS", "read-only")])
def test_a_full_or_read_only_store_is_one_line_and_not_transient(mode, errno_name, words, tmp_path):
    import errno

    out = _in_small_mount(mode, tmp_path)
    refused = out["object"]
    assert refused is not None, out
    assert refused[0] == getattr(errno, errno_name) and words in refused[1] and "\n" not in refused[1]
    if mode == "ro":
        assert out["index"] is not None and out["tree"] is not None
    assert out["leftovers"] == [] and out["readable"] == "kept"
    exc = StoreNotWritable(refused[1], refused[0])
    transient = _is_transient(exc)
    tally("bad inputs rejected cleanly", isinstance(exc, BadInput) and transient is False)
    assert isinstance(exc, BadInput) and transient is False


def _is_transient(exc: BaseException) -> bool:
    try:
        from squeezeflow.tasks._stage import is_transient
    except ImportError:
        from tasks._stage import is_transient
    return is_transient(None, None, SimpleNamespace(data=exc))
