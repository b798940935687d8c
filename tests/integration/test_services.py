"""The embedded servers: start on demand, reuse, one server under concurrent callers, stop, no leaks."""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from squeezeflow import services
from squeezeflow.errors import BadInput
from squeezeflow.service_procs import proc_start_time

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
    queue.close()
    queue.join_thread()
    # A forked child of a pytest process that earlier tests left with threads (Prefect clients, loggers)
    # can fail in interpreter teardown after its work is done; its answer is already delivered.
    os._exit(0)


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


# --- corrupt or lying state files, private files ------------------------------------------------------

def run_cli(args: list[str], services_dir: Path) -> subprocess.CompletedProcess:
    """The CLI in a child with only the embedded services dir configured (no S3 endpoint, no keys)."""
    env = {k: v for k, v in os.environ.items()
           if k not in (*services.S3_ENDPOINT_VARS, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "SQUEEZEFLOW_REGISTRY")}
    env["SQUEEZEFLOW_SERVICES"] = str(services_dir)
    return subprocess.run([sys.executable, "-m", "squeezeflow.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def assert_one_line_exit_2(p: subprocess.CompletedProcess, needle: str) -> None:
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and needle in lines[0], (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr


CORRUPT_STATES = {
    "not JSON": b"{\"pid\": 12",
    "binary": b"\x00\xff\xfe garbage",
    "a list": b"[1, 2]",
    "pid a string": b'{"pid": "1234", "ports": {}}',
    "pid a bool": b'{"pid": true}',
    "port out of range": b'{"ports": {"s3": 70000}}',
    "ports a list": b'{"ports": [9000]}',
    "oversized": b'{"x": "' + b"a" * 200_000 + b'"}',
}


def test_corrupt_state_never_starts_a_second_server_and_stop_still_stops(fresh_services: Path):
    pid = services.ensure_s3()["pid"]
    data_dir = Path(services.status()["seaweedfs"]["data_dir"])
    state_file = fresh_services / "seaweedfs" / "state.json"
    good = state_file.read_bytes()
    for label, raw in CORRUPT_STATES.items():
        state_file.write_bytes(raw)
        with pytest.raises(BadInput, match=re.escape(str(state_file)) + ".* is corrupt") as e:
            services.ensure_s3()
        assert "\n" not in str(e.value), label
        with pytest.raises(BadInput, match="is corrupt"):
            services.status()
        assert weed_pids(data_dir) == [pid], label  # the one server, untouched
    state_file.unlink()
    state_file.mkdir()  # not even a file
    with pytest.raises(BadInput, match="not a regular file"):
        services.ensure_s3()
    state_file.rmdir()

    # Through the CLI: one line, exit 2, for the commands that start a server and for status.
    state_file.write_bytes(CORRUPT_STATES["not JSON"])
    assert_one_line_exit_2(run_cli(["registry", "list"], fresh_services), "is corrupt")
    assert_one_line_exit_2(run_cli(["services", "status"], fresh_services), "is corrupt")
    assert weed_pids(data_dir) == [pid]

    # `services stop` finds the server through its lock, stops it and resets the corrupt file.
    p = run_cli(["services", "stop"], fresh_services)
    assert p.returncode == 0, p.stderr
    assert process_gone(pid) and weed_pids(data_dir) == []
    assert not state_file.exists() or json.loads(state_file.read_text()).get("pid") is None
    assert not services.status()["seaweedfs"]["running"]
    state_file.write_bytes(good)  # the remembered ports again: a restart still works, on them
    info = services.ensure_s3()
    assert info["pid"] != pid and weed_pids(data_dir) == [info["pid"]]


def test_a_state_file_that_lies_cannot_start_a_second_server_or_stop_a_stranger(fresh_services: Path):
    first = services.ensure_s3()
    data_dir = Path(services.status()["seaweedfs"]["data_dir"])
    state_file = fresh_services / "seaweedfs" / "state.json"
    stranger = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        # A well-formed state that names an unrelated process (with its real start time) as the server.
        state = json.loads(state_file.read_text())
        state.update(pid=stranger.pid, pid_start=proc_start_time(stranger.pid))
        state_file.write_text(json.dumps(state))
        assert services.status()["seaweedfs"]["pid"] == first["pid"]  # the lock holder, not the state's pid
        assert services.stop("seaweedfs") == {"seaweedfs": True}
        assert process_gone(first["pid"]) and stranger.poll() is None

        # A state without the pid while the server runs: the next start replaces it, never runs two.
        second = services.ensure_s3()
        state = json.loads(state_file.read_text())
        del state["pid"]
        state_file.write_text(json.dumps(state))
        third = services.ensure_s3()
        assert process_gone(second["pid"]) and weed_pids(data_dir) == [third["pid"]]
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


CORRUPT_CREDENTIALS = {
    "not JSON": b"{identities",
    "no identities": b'{"users": []}',
    "short secret": b'{"identities": [{"name": "x", "credentials": [{"accessKey": "SQFAAAAAAAAAAAAAAAAA", "secretKey": "x"}]}]}',
    "an extra identity": json.dumps({"identities": [
        {"name": "squeezeflow", "credentials": [{"accessKey": "SQFAAAAAAAAAAAAAAAAA", "secretKey": "s" * 40}]},
        {"name": "anonymous", "actions": ["Write"]}]}).encode(),
}


def test_corrupt_credentials_or_keys_are_one_line_before_any_start(fresh_services: Path):
    cred_file = fresh_services / "s3-credentials.json"
    fresh_services.mkdir()
    for label, raw in CORRUPT_CREDENTIALS.items():
        cred_file.write_bytes(raw)
        with pytest.raises(BadInput, match=re.escape(str(cred_file)) + " is corrupt"):
            services.ensure_s3()
    assert_one_line_exit_2(run_cli(["registry", "list"], fresh_services), "credentials file")
    assert not (fresh_services / "seaweedfs" / "data").exists()  # nothing was started
    cred_file.unlink()

    info = services.ensure_s3()  # new credentials and keys, made at the first start
    services.stop("seaweedfs")
    conf = fresh_services / "seaweedfs" / "conf"
    toml = conf / "security.toml"
    good = toml.read_text()
    for label, text in {"a JWT key removed": re.sub(r'(?m)^key = "[^"]+"$', 'key = ""', good, count=1),
                        "not TOML": good + "[[[", "TLS switched off": good.split("[grpc]")[0]}.items():
        toml.write_text(text)
        with pytest.raises(BadInput, match=re.escape(str(conf)) + " is corrupt"):
            services.ensure_s3()
    toml.write_text(good)
    (conf / "node.key").write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(BadInput, match="is corrupt .certificates"):
        services.ensure_s3()
    assert weed_pids(Path(info["log"]).parent / "data") == []


def test_state_credentials_and_keys_are_private(s3_server: dict):
    services_dir = s3_server["services_dir"]
    private = [services_dir / "s3-credentials.json", services_dir / "seaweedfs" / "state.json",
               services_dir / "seaweedfs" / "server.log", *(services_dir / "seaweedfs" / "conf").iterdir()]
    assert len(private) >= 7
    for f in private:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    for d in (services_dir, services_dir / "seaweedfs", services_dir / "seaweedfs" / "conf"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    # The JWT keys and the TLS key never reach the log, a command line or the server's environment.
    conf = services_dir / "seaweedfs" / "conf"
    secrets = re.findall(r'(?m)^key = "([^"/]+)"$', (conf / "security.toml").read_text())  # not key paths
    assert len(secrets) == 4
    tls_key = (conf / "node.key").read_text().split("-----")[2].strip()
    exposed = (Path(s3_server["log"]).read_bytes() + Path(f"/proc/{s3_server['pid']}/cmdline").read_bytes()
               + Path(f"/proc/{s3_server['pid']}/environ").read_bytes())
    for secret in [*secrets, tls_key.splitlines()[0]]:
        assert secret.encode() not in exposed


def test_protection_that_does_not_load_fails_the_start(fresh_services: Path, monkeypatch: pytest.MonkeyPatch):
    """SeaweedFS quietly serves plaintext gRPC when it cannot use its certificates: the start must fail."""
    from squeezeflow import seaweedfs

    real = seaweedfs.security_config

    def without_tls() -> Path:
        conf = real()
        text = (conf / "security.toml").read_text()
        (conf / "security.toml").write_text(text.split("[grpc]")[0])  # keys, but no TLS sections
        return conf

    monkeypatch.setattr(seaweedfs, "security_config", without_tls)
    with pytest.raises(services.ServiceError, match="without its protection on .*grpc"):
        services.ensure_s3()
    data_dir = fresh_services / "seaweedfs" / "data"
    assert weed_pids(data_dir) == [] and not services.status()["seaweedfs"]["running"]


def test_an_unprotected_server_from_before_is_replaced_not_reused(fresh_services: Path):
    """A weed started the old way (no keys, no lock, all ports open) still runs: the next start replaces it."""
    from squeezeflow import seaweedfs
    from squeezeflow.service_procs import http_ok, private_dir, write_state

    seaweedfs.credentials()
    data_dir = private_dir(fresh_services / "seaweedfs" / "data")
    ports = seaweedfs._ports(None)
    flags = [f"-{name.split('_')[0]}.port{'.grpc' if name.endswith('_grpc') else ''}={port}"
             for name, port in ports.items()]
    old = subprocess.Popen(  # the command line squeezeflow used before the lock-down
        [seaweedfs.weed_binary(), "-logtostderr", "mini", f"-dir={data_dir}", "-ip=127.0.0.1",
         "-ip.bind=127.0.0.1", "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
         "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={seaweedfs.credentials_path()}", *flags],
        cwd=data_dir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        write_state("seaweedfs", {"pid": old.pid, "pid_start": proc_start_time(old.pid), "ports": ports})
        deadline = time.monotonic() + 120
        while not http_ok(f"http://127.0.0.1:{ports['s3']}/healthz") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert services.status()["seaweedfs"]["pid"] == old.pid  # recognised as this data dir's server

        info = services.ensure_s3()
        assert info["pid"] != old.pid and old.wait(timeout=300) is not None
        assert weed_pids(data_dir) == [info["pid"]]
        assert json.loads((fresh_services / "seaweedfs" / "state.json").read_text())["locked_down"] is True
    finally:
        if old.poll() is None:
            old.kill()
            old.wait()
        seaweedfs.remove_sockets({"ports": ports})
