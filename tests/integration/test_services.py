"""The embedded servers: start on demand, reuse, one server under concurrent callers, stop, no leaks."""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import stat
import time
import urllib.request
from pathlib import Path

import pytest

from squeezeflow import services
from squeezeflow.errors import BadInput

pytestmark = pytest.mark.integration


def weed_pids(data_dir: Path) -> list[int]:
    """Processes running `weed mini` on this data dir."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if f"-dir={data_dir}".encode() in cmd and state != "Z":
                pids.append(int(proc.name))
    return pids


def process_gone(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) == "Z"
    except OSError:
        return True


def _ensure_in_child(queue) -> None:
    info = services.ensure_s3()
    queue.put((info["pid"], info["endpoint"]))


def test_status_and_stop_when_nothing_was_started(fresh_services: Path):
    st = services.status()
    assert set(st) == {"seaweedfs", "prefect"}
    assert all(not s["running"] and s["pid"] is None for s in st.values())
    assert services.stop() == {"seaweedfs": False, "prefect": False}
    with pytest.raises(BadInput, match="unknown service"):
        services.stop("minio")


def test_configured_endpoints_are_used_as_is(fresh_services: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SQUEEZEFLOW_S3_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    assert services.ensure_s3() == {"endpoint": "http://127.0.0.1:9", "embedded": False,
                                    "source": "SQUEEZEFLOW_S3_ENDPOINT"}
    assert services.ensure_prefect() == "http://127.0.0.1:9/api"
    assert not any(s["running"] for s in services.status().values())
    assert not fresh_services.exists() or not any(fresh_services.rglob("state.json"))


def test_session_server_is_running_and_reused(s3_server: dict):
    st = services.status()["seaweedfs"]
    assert st["running"] and st["healthy"]
    assert st["pid"] == s3_server["pid"] and st["url"] == os.environ["SQUEEZEFLOW_S3_ENDPOINT"]
    assert Path(st["data_dir"]).is_dir() and Path(st["log"]).stat().st_size > 0
    again = services.ensure_s3()
    assert again["embedded"] and again["pid"] == s3_server["pid"]  # reused, not restarted


def test_credentials_never_leak(s3_server: dict):
    services_dir = s3_server["services_dir"]
    cred_file = services_dir / "s3-credentials.json"
    assert stat.S_IMODE(cred_file.stat().st_mode) == 0o600
    key, secret = os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
    assert len(secret) >= 30 and secret.encode() in cred_file.read_bytes()

    log = Path(services.status()["seaweedfs"]["log"])
    assert log.stat().st_size > 1000  # a real log, so the check below means something
    for f in services_dir.rglob("*"):
        if f.is_file() and f != cred_file:
            data = f.read_bytes()
            assert secret.encode() not in data and key.encode() not in data, f
    shown = json.dumps(services.status())
    assert secret not in shown and key not in shown
    cmdline = Path(f"/proc/{s3_server['pid']}/cmdline").read_bytes()
    assert secret.encode() not in cmdline and key.encode() not in cmdline
    environ = Path(f"/proc/{s3_server['pid']}/environ").read_bytes()
    assert secret.encode() not in environ


def test_concurrent_callers_start_one_server_that_outlives_them(fresh_services: Path):
    ctx = multiprocessing.get_context("fork")  # forked children skip re-importing the package
    queue = ctx.Queue()
    children = [ctx.Process(target=_ensure_in_child, args=(queue,)) for _ in range(2)]
    for c in children:
        c.start()
    results = [queue.get(timeout=60) for _ in children]
    for c in children:
        c.join(30)
        assert c.exitcode == 0
    (pid1, url1), (pid2, url2) = results
    assert pid1 == pid2 and url1 == url2

    # The callers are gone; the server is still up, and it is the only one on this data dir.
    st = services.status()["seaweedfs"]
    assert st["running"] and st["healthy"] and st["pid"] == pid1
    data_dir = Path(st["data_dir"])
    assert weed_pids(data_dir) == [pid1]

    # This process reuses it, writes data, stops it; a restart keeps ports and data.
    info = services.ensure_s3()
    assert info["pid"] == pid1 and info["endpoint"] == url1
    from squeezeflow.s3 import client

    client().put_object(Bucket="squeezeflow", Key="persist/me", Body=b"kept")
    assert services.stop("seaweedfs") == {"seaweedfs": True}
    assert process_gone(pid1) and weed_pids(data_dir) == []
    st = services.status()["seaweedfs"]
    assert not st["running"] and st["pid"] is None and st["ports"]
    assert "pid" not in json.loads((fresh_services / "seaweedfs" / "state.json").read_text())

    info = services.ensure_s3()
    assert info["pid"] != pid1 and info["endpoint"] == url1
    assert client().get_object(Bucket="squeezeflow", Key="persist/me")["Body"].read() == b"kept"


def test_start_failure_names_the_log(fresh_services: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    fake = tmp_path / "weed"
    fake.write_text("#!/bin/sh\necho 'listen tcp: address already in use'\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("SQUEEZEFLOW_WEED", str(fake))
    log = fresh_services / "seaweedfs" / "server.log"
    with pytest.raises(services.ServiceError, match="status 3.*" + re.escape(str(log))):
        services.ensure_s3()
    assert "address already in use" in log.read_text()
    assert not services.status()["seaweedfs"]["running"]


def test_start_timeout_kills_the_server(fresh_services: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    fake = tmp_path / "weed"
    fake.write_text("#!/bin/sh\nexec sleep 300\n")  # never becomes healthy
    fake.chmod(0o755)
    monkeypatch.setenv("SQUEEZEFLOW_WEED", str(fake))
    t0 = time.monotonic()
    with pytest.raises(services.ServiceError, match="not ready after 2 s.*server.log"):
        services.ensure_s3(timeout=2)
    assert time.monotonic() - t0 < 20
    assert not services.status()["seaweedfs"]["running"]


def test_embedded_prefect_server(fresh_services: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    url = services.ensure_prefect()
    assert url.startswith("http://127.0.0.1:") and url.endswith("/api")
    with urllib.request.urlopen(url + "/health", timeout=5) as r:
        assert r.status == 200
    assert os.environ["PREFECT_API_URL"] == url
    assert os.environ["PREFECT_HOME"] == str(fresh_services / "prefect")
    assert (fresh_services / "prefect" / "prefect.db").exists()  # SQLite inside the services dir

    st = services.status()["prefect"]
    assert st["running"] and st["healthy"] and st["url"] == url
    assert services.ensure_prefect() == url and services.status()["prefect"]["pid"] == st["pid"]

    assert services.stop("prefect") == {"prefect": True}
    assert process_gone(st["pid"])
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "/health", timeout=2)
