"""The embedded servers: a local SeaweedFS (S3) and a local Prefect server, started on demand.

Any command that needs S3 or a Prefect API calls `ensure_s3()` / `ensure_prefect()`. When the user has
configured their own endpoint (SQUEEZEFLOW_S3_ENDPOINT / AWS_ENDPOINT_URL*, PREFECT_API_URL) these do
nothing. Otherwise they start a server on loopback, detached from the caller so later commands reuse it,
and export its address (and for S3 its credentials) into this process's environment.

State lives under `settings.services_dir()` (directories 0700, files 0600):
    s3-credentials.json        random access key + secret (weed's -s3.config format), made once
    seaweedfs/conf/            JWT keys and TLS certificates that lock down SeaweedFS's other ports
    seaweedfs/state.json       chosen ports (kept across restarts) and the running pid
    seaweedfs/server.log       the server's stdout/stderr
    seaweedfs/data/            the S3 data
    prefect/                   PREFECT_HOME (SQLite database, local result storage) + state.json, server.log
    <name>/server.lock         held by the running server itself: at most one server per data dir
    <name>.lock                held while starting or stopping: two processes never start two servers

How SeaweedFS is locked down is in seaweedfs.py; processes, state and locks in service_procs.py.
The secret is read by weed from its file and handed to this process's boto3 through its environment;
it is never printed, logged, put on a command line, in state files or in `status()` output.
A corrupt state or credentials file is a BadInput naming it; `stop()` still stops the server (found
through its lock, not the state file) and resets a corrupt state file.
"""
from __future__ import annotations

import os
import sys
from typing import Any

from . import seaweedfs
from .errors import BadInput
from .service_procs import ServiceError  # noqa: F401  (part of this module's API)
from .service_procs import data_dir as _data_dir
from .service_procs import free_ports as _free_ports
from .service_procs import http_ok as _http_ok
from .service_procs import log_path as _log_path
from .service_procs import port_free as _port_free
from .service_procs import read_state as _read_state
from .service_procs import write_state as _write_state  # noqa: F401  (tests seed a state with it)
from .service_procs import (private_dir, server_pids, service_dir, spawn, starter_lock, stop_server,
                            wait_ready)

SERVICES = ("seaweedfs", "prefect")
BUCKET = seaweedfs.BUCKET
REGION = "us-east-1"
S3_ENDPOINT_VARS = ("SQUEEZEFLOW_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_CLEANUP = {"seaweedfs": seaweedfs.remove_sockets, "prefect": None}

# The addresses ensure_*() exported here: seeing one in the environment means "ours", not "configured",
# so a later call still checks (and if need be restarts) the embedded server.
_exported_s3: str | None = None
_exported_prefect: str | None = None


def embedded_registry_uri() -> str:
    return f"s3://{BUCKET}/registry"


# --- public API -------------------------------------------------------------------------------------

def ensure_s3(timeout: float = 60.0) -> dict[str, Any]:
    """Make an S3 endpoint usable from this process; start the embedded SeaweedFS if none is configured.

    Returns {"endpoint", "embedded", ...}; for the embedded server also "bucket", "registry", "pid",
    "log". Raises ServiceError (naming the log file) when the server does not become ready in `timeout`,
    BadInput when its state or credentials file is corrupt (before anything is started).
    """
    if os.environ.get("SQUEEZEFLOW_S3_BLOCK"):  # a prefect-aws block configured S3 (aws_blocks.py): keep it
        return {"endpoint": os.environ.get("SQUEEZEFLOW_S3_ENDPOINT") or "AWS", "embedded": False,
                "source": os.environ["SQUEEZEFLOW_S3_BLOCK"]}
    for var in S3_ENDPOINT_VARS:
        value = os.environ.get(var)
        if value and not (var == "SQUEEZEFLOW_S3_ENDPOINT" and value == _exported_s3):
            return {"endpoint": value, "embedded": False, "source": var}

    with starter_lock("seaweedfs"):
        creds = seaweedfs.credentials()
        state = _read_state("seaweedfs")
        # Export first: the readiness probe below uses boto3 with exactly these settings.
        if state.get("ports"):
            _export_s3_env(state, creds)
        if not (state.get("locked_down") and state.get("pid") in server_pids("seaweedfs", state)
                and seaweedfs.probe(state) == "ok"):
            # Whatever runs on this data dir (found through its lock, whatever the state file says) goes.
            stop_server("seaweedfs", state, cleanup=seaweedfs.remove_sockets)
            state = seaweedfs.start(creds, timeout, lambda st: _export_s3_env(st, creds), _child_env())
        _export_s3_env(state, creds)
    return {"endpoint": seaweedfs.s3_url(state), "embedded": True, "bucket": BUCKET,
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

    with starter_lock("prefect"):
        state = _read_state("prefect")
        if not (state.get("pid") in server_pids("prefect", state) and _http_ok(_prefect_url(state) + "/health")):
            stop_server("prefect", state)
            state = _start_prefect(timeout)
    url = _exported_prefect = os.environ["PREFECT_API_URL"] = _prefect_url(state)
    # Same home as the server, so local result storage and profiles stay inside the services dir.
    os.environ["PREFECT_HOME"] = str(service_dir("prefect"))
    if "prefect.context" in sys.modules:
        sys.modules["prefect.context"].refresh_global_settings_context()
    return url


def flush_prefect_events() -> None:
    """Send the Prefect events this process has queued (loading a block emits some). A command that then fails
    fast (a refused secret) exited with them queued, and the events worker's "Still processing items" warning
    landed beside our one error line. Sent now, without that progress note; the worker restarts on the next event."""
    import logging

    from prefect.events.worker import EventsWorker

    logging.getLogger(EventsWorker.__name__).setLevel(logging.ERROR)
    EventsWorker.drain_all(timeout=30)


def status() -> dict[str, dict[str, Any]]:
    """What each embedded server is doing. Safe to call when nothing was ever started."""
    out: dict[str, dict[str, Any]] = {}
    for name in SERVICES:
        state = _read_state(name)
        pids = server_pids(name, state) if service_dir(name).is_dir() else []
        info: dict[str, Any] = {
            "running": bool(pids),
            "pid": pids[0] if pids else None,
            "ports": state.get("ports", {}),
            "log": str(_log_path(name)),
            "data_dir": str(_data_dir(name)),
        }
        if state.get("ports"):
            info["url"] = seaweedfs.s3_url(state) if name == "seaweedfs" else _prefect_url(state)
        if pids:
            info["healthy"] = _http_ok(info["url"] + ("/healthz" if name == "seaweedfs" else "/health")) \
                if "url" in info else False
            info["started"] = state.get("started")
        out[name] = info
    return out


def stop(name: str | None = None, timeout: float = 15.0) -> dict[str, bool]:
    """Stop one embedded server (or both): SIGTERM its process group, SIGKILL after `timeout`.

    Returns {name: True if a running server was stopped}. Ports and data are kept for the next start; a
    corrupt state file does not get in the way (the server is found through its lock) and is reset.
    """
    if name is not None and name not in SERVICES:
        raise BadInput(f"unknown service {name!r}; choose one of: {', '.join(SERVICES)}")
    result = {}
    for n in ([name] if name else SERVICES):
        if not service_dir(n).is_dir():
            result[n] = False  # never started here: touch nothing on disk
            continue
        with starter_lock(n):
            result[n] = stop_server(n, _read_state(n, lenient=True), timeout, cleanup=_CLEANUP[n])
    return result


def _child_env() -> dict[str, str]:
    # The servers must not inherit the caller's cloud credentials or endpoints: weed mini would turn
    # AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY into an extra admin identity (and log the key id).
    drop = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", *S3_ENDPOINT_VARS}
    return {k: v for k, v in os.environ.items() if k not in drop}


# --- SeaweedFS: this process's S3 client ------------------------------------------------------------

def _export_s3_env(state: dict, creds: dict[str, str]) -> None:
    global _exported_s3
    _exported_s3 = os.environ["SQUEEZEFLOW_S3_ENDPOINT"] = seaweedfs.s3_url(state)
    os.environ["AWS_ACCESS_KEY_ID"] = creds["access_key_id"]
    os.environ["AWS_SECRET_ACCESS_KEY"] = creds["secret_access_key"]
    os.environ["AWS_REGION"] = REGION
    # A session token belongs to some other credentials and would make every request fail signature checks.
    os.environ.pop("AWS_SESSION_TOKEN", None)
    # boto3's default session caches the first credentials it resolved; drop it so ours are used.
    if "boto3" in sys.modules:
        sys.modules["boto3"].DEFAULT_SESSION = None


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
    home = private_dir(service_dir("prefect"))
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
    state = spawn("prefect", cmd, env, ports={"api": port})
    wait_ready("prefect", state, timeout, lambda: _http_ok(_prefect_url(state) + "/health"))
    return state
