"""Large files publish as create-only multipart uploads (s3transfer) to the real SeaweedFS server and pull
back byte-identical; the manifest is still written last, and a re-publish uploads nothing. The multipart
threshold is lowered so a 12 MiB file goes up in three 5 MiB-class parts (S3's minimum part size)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from squeezeflow.errors import IntegrityError
from squeezeflow.registry import ImmutableEntryError, Registry

from test_registry import MODEL, RECIPE, make_artifact

pytestmark = pytest.mark.integration

MiB = 1024**2


def big_artifact(root: Path, seed: int = 0) -> Path:
    """make_artifact's directory with a 12 MiB model.safetensors, its manifest rewritten to match and made
    authentic as the pipeline makes it (lineage, model, content id: `manifest.json`'s artifact_id)."""
    import random

    from squeezeflow.registry import content_id
    from squeezeflow.store import canonical_json, sha256_bytes

    make_artifact(root, seed)
    data = random.Random(seed).randbytes(12 * MiB + 12345)
    (root / "model.safetensors").write_bytes(data)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"]["model.safetensors"] = {"sha256": sha256_bytes(data), "size": len(data)}
    manifest.update(model=MODEL, lineage={"model": {"name": MODEL}, "recipe": {"name": RECIPE}})
    manifest["artifact_id"] = content_id(manifest["files"], manifest["lineage"])
    (root / "manifest.json").write_bytes(canonical_json(manifest))
    return root


def record_calls(reg: Registry) -> list[tuple[str, dict]]:
    """Every S3 operation the registry's client sends, in order, with its parameters."""
    calls: list[tuple[str, dict]] = []

    def before(params, model, **_):
        calls.append((model.name, dict(params)))

    reg._c.meta.events.register("before-parameter-build.s3", before)
    return calls


@pytest.fixture
def small_parts(registry: Registry) -> Registry:
    registry.multipart_threshold = 8 * MiB
    registry.multipart_chunksize = 5 * MiB
    return registry


def test_large_file_round_trips_through_a_create_only_multipart_upload(small_parts: Registry, tmp_path: Path):
    reg = small_parts
    src = big_artifact(tmp_path / "a")
    calls = record_calls(reg)
    artifact_id = json.loads((src / "manifest.json").read_text())["artifact_id"]
    entry = reg.publish(src, MODEL, RECIPE, artifact_id)
    ops = [name for name, _ in calls]
    big_key = reg._key(entry, "model.safetensors")
    parts = [p for name, p in calls if name == "UploadPart" and p["Key"] == big_key]
    assert len(parts) == 3 and all(p.get("ChecksumAlgorithm") == "SHA256" for p in parts), ops
    assert not [p for name, p in calls if name == "PutObject" and p["Key"] == big_key]
    completes = [p for name, p in calls if name == "CompleteMultipartUpload"]
    assert len(completes) == 1 and completes[0]["IfNoneMatch"] == "*"
    # the small files still go up with one conditional PUT each, and the manifest is the last write
    writes = [p["Key"] for name, p in calls if name in ("PutObject", "CompleteMultipartUpload")
              and p["Key"].startswith(reg._key(entry) + "/")]
    assert writes[-1] == reg._key(entry, "manifest.json") and len(writes) == 6, writes
    # SeaweedFS reports the parts' composite SHA256: the upload is checked against it, not read back.
    assert not [name for name, p in calls if name == "GetObject" and p.get("Key") == big_key]
    pulled = reg.pull(entry.uri, tmp_path / "pulled")
    for rel in ("model.safetensors", "config.json", "report/plots/ppl.png"):
        assert (pulled / rel).read_bytes() == (src / rel).read_bytes(), rel
    assert hashlib.sha256((pulled / "model.safetensors").read_bytes()).hexdigest() == \
        hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest()

    # Re-publishing the same content uploads nothing.
    calls.clear()
    reg.publish(src, MODEL, RECIPE, artifact_id)
    assert not [name for name, _ in calls if name in ("PutObject", "UploadPart", "CreateMultipartUpload")], calls


def test_other_bytes_under_an_existing_large_key_are_refused(small_parts: Registry, tmp_path: Path):
    reg = small_parts
    reg.publish(big_artifact(tmp_path / "a", seed=1), MODEL, RECIPE, "big2")
    # A crashed publish of other content under the same id left its manifest out: the large file that is
    # there now holds other bytes, and is never overwritten.
    other = big_artifact(tmp_path / "b", seed=2)
    entry = reg._entry(MODEL, RECIPE, "big2")
    reg._c.delete_object(Bucket=reg.loc.bucket, Key=reg._key(entry, "manifest.json"))
    with pytest.raises(ImmutableEntryError, match="already holds different bytes"):
        reg.publish(other, MODEL, RECIPE, "big2")


def test_completing_onto_an_existing_key_is_refused_by_the_server(small_parts: Registry, tmp_path: Path):
    """Create-only holds for the multipart path itself, not only through the check before it: an upload
    racing another publisher (the key appears after the check) does not replace what is there."""
    reg = small_parts
    src = big_artifact(tmp_path / "a", seed=3)
    meta = {"sha256": hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest(),
            "size": (src / "model.safetensors").stat().st_size}
    key = reg.loc.key("race/model.safetensors")
    assert reg._put_new_file(key, src / "model.safetensors", meta["sha256"], meta["size"]) is True
    reg._head = lambda key, checksum=False, real=reg._head: None if not checksum else real(key, checksum)
    assert reg._put_new_file(key, src / "model.safetensors", meta["sha256"], meta["size"]) is False


def test_a_file_changed_during_upload_is_an_integrity_error(small_parts: Registry, tmp_path: Path):
    reg = small_parts
    src = big_artifact(tmp_path / "a", seed=4)
    with pytest.raises(IntegrityError, match="changed while it was uploaded"):
        reg._put_new_file(reg.loc.key("changed/model.safetensors"), src / "model.safetensors", "0" * 64,
                          (src / "model.safetensors").stat().st_size)


def test_an_interrupted_pull_resumes_where_it_stopped(registry: Registry, tmp_path: Path):
    """A pull cut off mid-file leaves its staging directory; the next pull of the same entry asks only for
    the missing bytes (a ranged GET) and ends byte-identical. Staged bytes that were tampered with fail
    their sha256, are dropped, and the pull after that starts the file over."""
    reg = registry
    src = big_artifact(tmp_path / "a", seed=5)
    entry = reg.publish(src, MODEL, RECIPE, json.loads((src / "manifest.json").read_text())["artifact_id"])
    big = reg._key(entry, "model.safetensors")
    real_stream, cut = reg._stream_from, 3 * MiB

    def cut_off(key, start, chunk=1 << 20):
        sent = 0
        for part in real_stream(key, start, chunk):
            if key == big and sent >= cut:
                raise ConnectionError("connection reset")
            sent += len(part)
            yield part

    reg._stream_from = cut_off
    with pytest.raises(ConnectionError):
        reg.pull(entry.uri, tmp_path / "pulled")
    assert not (tmp_path / "pulled").exists()
    (staging,) = tmp_path.glob(".pulled.pull-*")
    assert (staging / "model.safetensors").stat().st_size == cut

    reg._stream_from = real_stream
    calls = record_calls(reg)
    pulled = reg.pull(entry.uri, tmp_path / "pulled")
    gets = [p for name, p in calls if name == "GetObject" and p["Key"] == big]
    assert [p.get("Range") for p in gets] == [f"bytes={cut}-"]
    assert (pulled / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert not list(tmp_path.glob(".pulled.pull-*")) and not (pulled / ".pull.lock").exists()

    # Tampered staged bytes: the resumed file fails its sha256, the staging directory goes, a retry is clean.
    reg._stream_from = cut_off
    with pytest.raises(ConnectionError):
        reg.pull(entry.uri, tmp_path / "again")
    (staging,) = tmp_path.glob(".again.pull-*")
    data = bytearray((staging / "model.safetensors").read_bytes())
    data[100] ^= 0xFF
    (staging / "model.safetensors").write_bytes(bytes(data))
    reg._stream_from = real_stream
    with pytest.raises(IntegrityError, match="do not match the manifest"):
        reg.pull(entry.uri, tmp_path / "again")
    assert not list(tmp_path.glob(".again.pull-*"))
    assert (reg.pull(entry.uri, tmp_path / "again") / "model.safetensors").read_bytes() == \
        (src / "model.safetensors").read_bytes()
