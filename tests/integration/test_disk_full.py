"""Disk full while writing the artifact store: a real size-limited filesystem (tmpfs, needs root; the
test skips where it cannot mount one) holds the store. The run fails with one clear line, no object in
the store is corrupt (every object's bytes match its content address), and after space is freed the
same command completes with an artifact byte-identical to a run that never ran out of space."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from prefect_fixtures import prefect_server, shared_inputs, tiny_llama, worker_env  # noqa: F401  (fixtures by name)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def compress(model: Path, store: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "squeezeflow.cli", "--json", "compress", str(model), "--recipe",
                           "rtn-w4g64", "--calib-samples", "4", "--seqlen", "64", "--eval-windows", "2",
                           "--no-publish", "--store", str(store)], capture_output=True, text=True, cwd=cwd,
                          env=worker_env(SQUEEZEFLOW_TASK_RETRIES="2"), timeout=300)


def artifact_manifests(store: Path) -> dict[str, dict]:
    """The artifact manifests among a store's content-addressed objects, by sha256."""
    out = {}
    for p in (store / "objects").rglob("*"):
        data = p.read_bytes() if p.is_file() and p.stat().st_size < 2**20 else b""
        if data.startswith(b"{") and b'"artifact_id"' in data and b'"lineage"' in data:
            out[p.name] = json.loads(data)
    return out


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a size-limited tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_is_a_clear_error_and_resumes_after_space_is_freed(prefect_server, tiny_llama, small_fs, tmp_path):
    store = small_fs / "store"
    full = compress(tiny_llama, store, tmp_path)
    assert full.returncode == 2, full.stderr[-3000:]  # StoreNotWritable: one line, exit 2, not retried
    lines = [line for line in full.stderr.splitlines() if line.startswith("squeezeflow:")]
    assert lines and "no space left on device" in lines[-1] and "finished stages are reused" in lines[-1], full.stderr[-3000:]
    objects = [p for p in (store / "objects").rglob("*") if p.is_file()]
    assert objects, "the run failed before it wrote anything: the store was too small to test"
    assert not [p for p in objects if p.name.startswith(".tmp-")], "a partial write was left behind"
    corrupt = [p.name for p in objects if hashlib.sha256(p.read_bytes()).hexdigest() != p.name]
    assert corrupt == []

    subprocess.run(["mount", "-o", "remount,size=256m", str(small_fs)], check=True)
    resumed = compress(tiny_llama, store, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    clean_store = tmp_path / "clean-store"
    clean = compress(tiny_llama, clean_store, tmp_path)
    assert clean.returncode == 0, clean.stderr[-3000:]
    # Byte-identical artifacts: the same manifest object, and every file it lists, in both stores.
    want, got = artifact_manifests(clean_store), artifact_manifests(store)
    assert len(want) == 1 and set(want) == set(got), (sorted(want), sorted(got))
    files = next(iter(want.values()))["files"]
    assert "model.safetensors" in files
    assert all(any((store / "objects").rglob(meta["sha256"])) for meta in files.values())
