"""The S3 registry against a real SeaweedFS server (checksums, conditional writes and auth enforced)."""
from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from squeezeflow import s3
from squeezeflow.errors import BadInput, IntegrityError
from squeezeflow.registry import ImmutableEntryError, Registry, content_id, verify_dir
from squeezeflow.store import canonical_json, sha256_bytes

pytestmark = pytest.mark.integration

MODEL, RECIPE = "smollm2-135m", "rtn-w4g64"


def make_artifact(root: Path, seed: int = 0, metrics: dict | None = None) -> Path:
    """A small packed-artifact directory with a manifest listing every file."""
    rnd = random.Random(seed)
    files = {
        "config.json": json.dumps({"model_type": "llama", "quantization_config": {"quant_method": "squeezeflow"}}).encode(),
        "model.safetensors": rnd.randbytes(200_000),
        "tokenizer.json": json.dumps({"seed": seed}).encode(),
        "report/metrics.json": json.dumps({"perplexity": 30.0 + seed}).encode(),
        "report/plots/ppl.png": b"\x89PNG" + rnd.randbytes(1000),
    }
    root.mkdir(parents=True)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    manifest = {"recipe": RECIPE, "metrics": metrics or {"recipe": RECIPE, "perplexity": {"moby-dick": 44.0 + seed}},
                "files": {rel: {"sha256": sha256_bytes(d), "size": len(d)} for rel, d in files.items()}}
    (root / "manifest.json").write_bytes(canonical_json(manifest))
    return root


def record_puts(reg: Registry) -> list[str]:
    """Wrap the registry's client so every put_object key is recorded in order."""
    keys: list[str] = []
    real = reg._c.put_object

    def put_object(**kw):
        keys.append(kw["Key"])
        return real(**kw)

    reg._c.put_object = put_object
    return keys


def all_objects(reg: Registry) -> dict[str, tuple[str, datetime]]:
    out = {}
    for page in reg._c.get_paginator("list_objects_v2").paginate(Bucket=reg.loc.bucket, Prefix=reg.loc.prefix + "/"):
        for o in page.get("Contents", []):
            out[o["Key"]] = (o["ETag"], o["LastModified"])
    return out


def test_publish_list_show_pull_round_trip(registry: Registry, tmp_path: Path):
    src, a1 = make_authentic_artifact(tmp_path / "art", 0)
    entry = registry.publish(src, MODEL, RECIPE, a1)
    assert entry.uri == f"{registry.uri}/models/{MODEL}/{RECIPE}/{a1}"

    # Every ref form names the same entry.
    for ref in (entry.uri, entry.uri + "/", f"{MODEL}/{RECIPE}/{a1}", f"{MODEL}/{RECIPE}@latest", f"{MODEL}/{RECIPE}"):
        assert registry.resolve(ref) == entry.uri

    [listed] = registry.list()
    assert listed["uri"] == entry.uri and listed["aliases"] == ["latest"]
    assert (listed["model"], listed["recipe"], listed["artifact_id"]) == (MODEL, RECIPE, a1)
    assert listed["metrics"]["perplexity"]["moby-dick"] == 44.0
    assert datetime.fromisoformat(listed["created"]).tzinfo is not None
    assert registry.list(model="other-model") == []
    assert len(registry.list(model=MODEL, recipe=RECIPE)) == 1

    shown = registry.show(f"{MODEL}/{RECIPE}@latest")
    assert shown["uri"] == entry.uri and shown["aliases"] == ["latest"]
    assert shown["manifest"] == json.loads((src / "manifest.json").read_bytes())

    dest = registry.pull(f"{MODEL}/{RECIPE}@latest", tmp_path / "pulled" / "model")
    src_files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    dest_files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert dest_files == src_files
    for rel in src_files:
        assert (dest / rel).read_bytes() == (src / rel).read_bytes(), rel
    assert os.listdir(dest.parent) == ["model"]  # no temporary directory left behind
    assert verify_dir(dest)["metrics"] == shown["manifest"]["metrics"]  # authenticated
    # Pulling again into the same complete copy is a no-op, not an error.
    assert registry.pull(entry.uri, dest) == dest


def test_manifest_is_written_last_and_half_uploads_are_invisible(registry: Registry, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch):
    src = make_artifact(tmp_path / "art")
    puts = record_puts(registry)

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash before the manifest")

    monkeypatch.setattr(registry, "_put_manifest", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        registry.publish(src, MODEL, RECIPE, "half")
    entry_prefix = f"{registry.loc.prefix}/models/{MODEL}/{RECIPE}/half/"
    uploaded = [k for k in all_objects(registry) if k.startswith(entry_prefix)]
    assert len(uploaded) == 5  # the data files are there ...
    assert registry.list() == []  # ... but the entry is not visible
    with pytest.raises(BadInput, match="not completely published"):
        registry.resolve(f"{MODEL}/{RECIPE}/half")
    with pytest.raises(BadInput, match="no alias 'latest'"):
        registry.resolve(f"{MODEL}/{RECIPE}@latest")

    # A retry resumes: existing identical files are accepted (412 + checksum check), manifest goes last.
    monkeypatch.undo()
    puts.clear()
    entry = registry.publish(src, MODEL, RECIPE, "half")
    entry_puts = [k for k in puts if k.startswith(entry_prefix)]
    assert entry_puts[-1] == entry_prefix + "manifest.json"
    assert len(entry_puts) == 6 and puts[-1].endswith("/aliases/%s/%s/latest.json" % (MODEL, RECIPE))
    assert [e["uri"] for e in registry.list()] == [entry.uri]


def test_republish_identical_is_a_noop(registry: Registry, tmp_path: Path):
    src = make_artifact(tmp_path / "art")
    first = registry.publish(src, MODEL, RECIPE, "a1")
    before = all_objects(registry)
    puts = record_puts(registry)
    again = registry.publish(src, MODEL, RECIPE, "a1")
    assert again == first
    assert puts == []  # nothing uploaded, alias not rewritten
    assert all_objects(registry) == before


def test_refuses_to_overwrite_an_entry_with_a_different_manifest(registry: Registry, tmp_path: Path):
    registry.publish(make_artifact(tmp_path / "one", seed=1), MODEL, RECIPE, "a1")
    before = all_objects(registry)
    with pytest.raises(ImmutableEntryError, match="immutable"):
        registry.publish(make_artifact(tmp_path / "two", seed=2), MODEL, RECIPE, "a1")
    assert all_objects(registry) == before
    assert registry.show(f"{MODEL}/{RECIPE}/a1")["manifest"]["metrics"]["perplexity"]["moby-dick"] == 45.0


def test_leftover_file_with_other_bytes_blocks_publish(registry: Registry, tmp_path: Path):
    # A crashed publish of different content left a file (no manifest): it must not be mixed in.
    src = make_artifact(tmp_path / "art")
    key = f"{registry.loc.prefix}/models/{MODEL}/{RECIPE}/a1/tokenizer.json"
    registry._c.put_object(Bucket=registry.loc.bucket, Key=key, Body=b'{"other": true}')
    with pytest.raises(ImmutableEntryError, match="tokenizer.json"):
        registry.publish(src, MODEL, RECIPE, "a1")
    assert registry.list() == []


def test_interleaved_promotes_do_not_lose_an_update(s3_server: dict, tmp_path: Path):
    # A reads the alias, B moves it, then A writes: A's If-Match must fail (412) and A must retry on top
    # of B's version, so the alias history shows both moves.
    uri = f"s3://{s3_server['bucket']}/test-race-{os.getpid()}-{time.monotonic_ns()}"
    setup = Registry(uri)
    e1 = setup.publish(make_artifact(tmp_path / "a", seed=1), MODEL, RECIPE, "e1")
    e2 = setup.publish(make_artifact(tmp_path / "b", seed=2), MODEL, RECIPE, "e2")
    ra, rb = Registry(uri), Registry(uri)
    a_has_read, b_done = threading.Event(), threading.Event()
    real_read = ra._read_alias

    def stale_read(*args):
        result = real_read(*args)
        if not a_has_read.is_set():
            a_has_read.set()
            b_done.wait(10)  # by the time A writes, its ETag is stale
        return result

    ra._read_alias = stale_read
    statuses = record_status(ra)
    errors: list[BaseException] = []
    thread = threading.Thread(target=lambda: _capture(errors, ra.promote, e1.uri, "production"))
    thread.start()
    assert a_has_read.wait(10)
    rb.promote(e2.uri, "production")
    b_done.set()
    thread.join(20)
    assert not errors
    assert 412 in statuses  # A's first conditional write was rejected
    pointer = rb._read_alias(MODEL, RECIPE, "production")[0]
    assert pointer["uri"] == e1.uri
    assert [h["artifact_id"] for h in pointer["history"]] == ["e1", "e2"]
    assert setup.show("%s/%s@production" % (MODEL, RECIPE))["aliases"] == ["production"]


def test_concurrent_promotes_all_land(s3_server: dict, tmp_path: Path):
    uri = f"s3://{s3_server['bucket']}/test-stress-{os.getpid()}-{time.monotonic_ns()}"
    setup = Registry(uri)
    entries = [setup.publish(make_artifact(tmp_path / f"e{i}", seed=i), MODEL, RECIPE, f"e{i}") for i in range(4)]
    clients = [Registry(uri) for _ in entries]  # one client per thread, like separate processes
    barrier = threading.Barrier(len(entries))
    errors: list[BaseException] = []

    def promote(reg: Registry, entry) -> None:
        barrier.wait()
        reg.promote(entry.uri, "production")

    threads = [threading.Thread(target=_capture, args=(errors, promote, r, e)) for r, e in zip(clients, entries)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    pointer = setup._read_alias(MODEL, RECIPE, "production")[0]
    history = [h["artifact_id"] for h in pointer["history"]]
    assert sorted(history) == ["e0", "e1", "e2", "e3"]  # every promotion is recorded exactly once
    assert pointer["artifact_id"] == history[0]
    # The append-only alias history (registry history) also holds every move exactly once, numbered 1..n.
    moves = setup.history(MODEL, RECIPE, "production")
    assert [h["seq"] for h in moves] == [1, 2, 3, 4]
    assert sorted(h["artifact_id"] for h in moves) == ["e0", "e1", "e2", "e3"]


def test_pull_refuses_a_tampered_object(registry: Registry, tmp_path: Path):
    src, a1 = make_authentic_artifact(tmp_path / "art", 0)
    entry = registry.publish(src, MODEL, RECIPE, a1)
    key = f"{registry.loc.prefix}/models/{MODEL}/{RECIPE}/{a1}/model.safetensors"
    data = bytearray((src / "model.safetensors").read_bytes())
    data[1234] ^= 0x01  # same size, one bit different
    registry._c.put_object(Bucket=registry.loc.bucket, Key=key, Body=bytes(data))

    dest = tmp_path / "pulled" / "model"
    with pytest.raises(IntegrityError, match="model.safetensors"):
        registry.pull(entry.uri, dest)
    assert not dest.exists()
    assert os.listdir(dest.parent) == []  # the temporary download was removed

    # An extra, unlisted object is refused too.
    registry._c.put_object(Bucket=registry.loc.bucket, Key=key, Body=(src / "model.safetensors").read_bytes())
    registry._c.put_object(Bucket=registry.loc.bucket, Key=key.replace("model.safetensors", "evil.py"), Body=b"x")
    with pytest.raises(IntegrityError, match="evil.py"):
        registry.pull(entry.uri, dest)


def make_authentic_artifact(root: Path, seed: int) -> tuple[Path, str]:
    """make_artifact with what the pipeline adds: lineage, model and the content id."""
    make_artifact(root, seed)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest.update(model=MODEL, lineage={"model": {"name": MODEL}, "recipe": {"name": RECIPE}})
    manifest["artifact_id"] = content_id(manifest["files"], manifest["lineage"])
    (root / "manifest.json").write_bytes(canonical_json(manifest))
    return root, manifest["artifact_id"]


def test_pull_refuses_a_manifest_that_points_elsewhere(registry: Registry, tmp_path: Path):
    a, a_id = make_authentic_artifact(tmp_path / "a", 1)
    b, b_id = make_authentic_artifact(tmp_path / "b", 2)
    entry = registry.publish(a, MODEL, RECIPE, a_id)
    assert verify_dir(registry.pull(entry.uri, tmp_path / "ok"))["artifact_id"] == a_id  # authenticated
    # Entry a's manifest replaced by b's: valid and self-consistent, but it names another entry.
    key = f"{registry.loc.prefix}/models/{MODEL}/{RECIPE}/{a_id}/manifest.json"
    registry._c.put_object(Bucket=registry.loc.bucket, Key=key, Body=(b / "manifest.json").read_bytes())
    with pytest.raises(IntegrityError, match=f"artifact_id '{b_id}'.*points elsewhere"):
        registry.pull(entry.uri, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_verify_dir_names_the_modified_file(tmp_path: Path):
    art = make_artifact(tmp_path / "art")
    assert verify_dir(art, authenticate=False)["files"]["config.json"]["size"] > 0
    path = art / "report" / "metrics.json"
    path.write_bytes(path.read_bytes().replace(b"3", b"4"))
    with pytest.raises(IntegrityError, match="report/metrics.json"):
        verify_dir(art)
    with pytest.raises(BadInput, match="no manifest.json"):
        verify_dir(tmp_path)


def test_server_rejects_a_corrupted_upload_body(registry: Registry):
    # The SHA256 sent with each PUT is checked by the server, so corrupted bytes never land.
    with pytest.raises(IntegrityError, match="do not match"):
        registry._put_new(f"{registry.loc.prefix}/x", b"actual bytes", sha256_bytes(b"expected bytes"))


def test_unreachable_endpoint_is_bad_input_quickly(s3_server: dict, monkeypatch: pytest.MonkeyPatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    monkeypatch.setenv("SQUEEZEFLOW_S3_ENDPOINT", f"http://127.0.0.1:{port}")
    t0 = time.monotonic()
    with pytest.raises(BadInput, match="unreachable"):
        s3.check_reachable("s3://squeezeflow/registry")
    with pytest.raises(BadInput, match="unreachable"):
        Registry("s3://squeezeflow/registry", s3.client(connect_timeout=1, max_attempts=1)).list()
    assert time.monotonic() - t0 < 10


def test_wrong_credentials_are_bad_input(s3_server: dict, monkeypatch: pytest.MonkeyPatch):
    import boto3

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
    with pytest.raises(BadInput, match="denied"):
        s3.check_reachable("s3://squeezeflow/registry")
    with pytest.raises(BadInput, match="access denied"):
        Registry("s3://squeezeflow/registry").list()


def test_bad_refs_and_names_are_bad_input(registry: Registry, tmp_path: Path):
    with pytest.raises(BadInput):
        registry.resolve("s3://elsewhere/models/m/r/id")
    with pytest.raises(BadInput):
        registry.resolve("just-a-model")
    with pytest.raises(BadInput, match="invalid model"):
        registry.publish(make_artifact(tmp_path / "art"), "org/model", RECIPE, "a1")
    with pytest.raises(BadInput, match="no registry entry"):
        registry.show(f"{MODEL}/{RECIPE}/missing")


def record_status(reg: Registry) -> list[int]:
    """HTTP statuses of the registry client's failed put_object calls."""
    from botocore.exceptions import ClientError

    statuses: list[int] = []
    real = reg._c.put_object

    def put_object(**kw):
        try:
            return real(**kw)
        except ClientError as e:
            statuses.append(e.response["ResponseMetadata"]["HTTPStatusCode"])
            raise

    reg._c.put_object = put_object
    return statuses


def _capture(errors: list[BaseException], fn, *args) -> None:
    try:
        fn(*args)
    except BaseException as e:  # surfaced by the main thread's assertion
        errors.append(e)
