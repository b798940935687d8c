"""Processes, state files and locks of the embedded servers (see services.py for what they are).

Which server runs on a data directory is never taken from the state file alone: every server is spawned
holding an exclusive flock on `<service dir>/server.lock` (the descriptor is inherited by the server and
stays locked until the server exits). "Running" means some process holds that lock; stopping means
signalling the holders. A lost, stale or corrupt state file therefore cannot hide a running server, start
a second one on the same data, or make `stop` signal an unrelated process.

Files written here are readable by their owner only: state and lock files 0600, service dirs 0700.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import socket
import stat
import subprocess
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Container, Iterator

from . import settings
from .errors import BadInput

_MAX_STATE_BYTES = 64 * 1024  # a state file is a few hundred bytes; anything near this is not ours

# Popen handles of servers this process started: keeping them lets stop reap the child, so it does not
# linger as a zombie.
_spawned: dict[str, subprocess.Popen] = {}


class ServiceError(RuntimeError):
    """An embedded server could not be started or stopped (exit status 1, not a user error)."""


# --- places ---------------------------------------------------------------------------------------------

def service_dir(name: str) -> Path:
    return settings.services_dir() / name


def data_dir(name: str) -> Path:
    # Prefect's data (SQLite, results) lives in its home; SeaweedFS's in a subfolder next to its log.
    return service_dir(name) / "data" if name == "seaweedfs" else service_dir(name)


def log_path(name: str) -> Path:
    return service_dir(name) / "server.log"


def state_path(name: str) -> Path:
    return service_dir(name) / "state.json"


def _server_lock_path(name: str) -> Path:
    return service_dir(name) / "server.lock"


def private_dir(path: Path) -> Path:
    """Create `path` (and parents) and make it 0700: it holds keys, credentials and server state."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)
    return path


def write_private(path: Path, data: bytes) -> None:
    """Atomically replace `path` with `data`, mode 0600 from the first byte on."""
    private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # a leftover temp file may have had other bits
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_small(path: Path, what: str, limit: int = _MAX_STATE_BYTES) -> bytes | None:
    """The bytes of a small file of ours, None if absent; BadInput naming it if it is not a readable file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as e:
        reason = "a symlink" if e.errno == errno.ELOOP else (e.strerror or type(e).__name__)
        raise BadInput(f"{what} {path} is unreadable ({reason}); remove it") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BadInput(f"{what} {path} is not a regular file; remove it")
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise BadInput(f"{what} {path} is corrupt (over {limit} bytes); remove it")
    return data


# --- state ----------------------------------------------------------------------------------------------

def _state_problem(state: object) -> str | None:
    if not isinstance(state, dict):
        return "not a JSON object"
    pid = state.get("pid")
    if pid is not None and (type(pid) is not int or pid <= 1):
        return f"pid {pid!r} is not a process id"
    start = state.get("pid_start")
    if start is not None and (type(start) is not int or start < 0):
        return f"pid_start {start!r} is not a start time"
    ports = state.get("ports", {})
    if not isinstance(ports, dict) or not all(
            isinstance(k, str) and type(v) is int and 0 < v < 65536 for k, v in ports.items()):
        return "ports are not a map of names to port numbers"
    if not isinstance(state.get("started", ""), str):
        return "started is not a time stamp"
    if not isinstance(state.get("locked_down", False), bool):
        return "locked_down is not true or false"
    return None


def read_state(name: str, lenient: bool = False) -> dict:
    """The service's state ({} if none). A corrupt file raises BadInput, or with `lenient` reads as {}."""
    path = state_path(name)
    try:
        raw = read_small(path, f"embedded {name} state file")
        if raw is None:
            return {}
        try:
            state = json.loads(raw)
        except ValueError as e:  # also UnicodeDecodeError
            problem = f"not JSON: {e}".splitlines()[0]
        else:
            problem = _state_problem(state)
        if problem:
            raise BadInput(f"embedded {name} state file {path} is corrupt ({problem}); "
                           "`squeezeflow services stop` stops its server and resets it")
        return state
    except BadInput:
        if lenient:
            return {}
        raise


def write_state(name: str, state: dict) -> None:
    write_private(state_path(name), (json.dumps(state, indent=1, sort_keys=True) + "\n").encode())


def forget_pid(name: str) -> None:
    """Drop the pid from the state (ports stay for the next start); a corrupt state file is removed."""
    state = read_state(name, lenient=True)
    if not state:
        with contextlib.suppress(OSError):  # absent, or a directory: the next start names it
            state_path(name).unlink()
        return
    if any(k in state for k in ("pid", "pid_start", "started", "locked_down")):
        for key in ("pid", "pid_start", "started", "locked_down"):
            state.pop(key, None)
        write_state(name, state)


@contextlib.contextmanager
def starter_lock(name: str) -> Iterator[None]:
    """Serialises starting/stopping a service across processes (not held by the server itself)."""
    path = settings.services_dir() / f"{name}.lock"
    private_dir(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when the descriptor closes, also if this process dies
        yield
    finally:
        os.close(fd)


# --- which process is the server ------------------------------------------------------------------------

def _lock_is_held(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the lock if we just took it
    return False


def _holds_file(pid: int, ident: tuple[int, int]) -> bool:
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                st = os.stat(fd)
                if (st.st_dev, st.st_ino) == ident:
                    return True
    return False


def _is_our_server(name: str, pid: int) -> bool:
    # Servers run as their own session leader (start_new_session) in the service's data dir; a process
    # that merely has the lock file open for a moment (another squeezeflow checking it) is neither.
    try:
        return os.getpgid(pid) == pid and os.readlink(f"/proc/{pid}/cwd") == str(data_dir(name).resolve())
    except OSError:
        return False


def proc_start_time(pid: int) -> int | None:
    """Kernel start time of a process (Linux); with the pid it identifies the process across pid reuse."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # after the parenthesised command name
    return None if fields[0] == "Z" else int(fields[19])  # a zombie is gone for our purposes


def server_pids(name: str, state: dict | None = None) -> list[int]:
    """The processes running this service on its data dir, found through the server lock."""
    path = _server_lock_path(name)
    hint = (state or {}).get("pid")
    if hint:
        _reap(hint)
    if not _lock_is_held(path):
        # No lock holder. A server started before servers held the lock is still recognised by its
        # recorded pid and start time, in its data dir.
        if hint and state.get("pid_start") is not None and proc_start_time(hint) == state["pid_start"] \
                and _is_our_server(name, hint):
            return [hint]
        return []
    if not Path("/proc/self/fd").is_dir():  # no procfs: the recorded pid is all we have
        return [hint] if hint else []
    st = path.stat()
    ident = (st.st_dev, st.st_ino)
    if hint and _holds_file(hint, ident) and _is_our_server(name, hint):
        return [hint]
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            pid = int(proc.name)
            if _holds_file(pid, ident) and _is_our_server(name, pid):
                pids.append(pid)
    return pids


def _reap(pid: int) -> None:
    """Collect the exit status if the server is our own child, so it does not stay a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


# --- start and stop -------------------------------------------------------------------------------------

def spawn(name: str, cmd: list[str], env: dict[str, str], ports: dict[str, int]) -> dict:
    """Start a server (in its data dir) that holds the service's server lock for as long as it runs."""
    private_dir(service_dir(name))
    cwd = private_dir(data_dir(name))
    log = log_path(name)
    lock_fd = os.open(_server_lock_path(name), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ServiceError(f"an embedded {name} server still runs on {data_dir(name)}; "
                               "`squeezeflow services stop` stops it") from None
        log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        with os.fdopen(log_fd, "ab") as f:
            f.write(f"\n--- squeezeflow: starting {name} at {now()} ---\n".encode())
            f.flush()
            # A new session: the server survives this process and its terminal, and stop can signal the
            # whole process group (prefect's server runs uvicorn in children). pass_fds hands it the
            # locked descriptor: the lock now lives exactly as long as the server.
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
                                    pass_fds=(lock_fd,))
    finally:
        os.close(lock_fd)
    _spawned[name] = proc
    state = {"pid": proc.pid, "pid_start": proc_start_time(proc.pid), "ports": ports, "started": now()}
    write_state(name, state)
    return state


def wait_ready(name: str, state: dict, timeout: float, ready: Callable[[], bool],
               cleanup: Callable[[dict], None] | None = None) -> None:
    deadline = time.monotonic() + timeout
    proc = _spawned.get(name)
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            _spawned.pop(name, None)
            forget_pid(name)
            raise ServiceError(f"embedded {name} server exited with status {proc.returncode} during start-up; "
                               f"see {log_path(name)}")
        if ready():
            return
        time.sleep(0.25)
    stop_server(name, state, cleanup=cleanup)
    raise ServiceError(f"embedded {name} server not ready after {timeout:.0f} s; see {log_path(name)}")


def stop_server(name: str, state: dict, timeout: float = 15.0,
                cleanup: Callable[[dict], None] | None = None) -> bool:
    """Stop whatever runs on the service's data dir (caller holds starter_lock). True if something ran."""
    pids = server_pids(name, state)
    if pids:
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, sig)  # each server is its own process-group leader
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and server_pids(name, state):
                time.sleep(0.1)
            if not server_pids(name, state):
                break
        else:
            raise ServiceError(f"could not stop embedded {name} server (pid {pids}); see {log_path(name)}")
    proc = _spawned.pop(name, None)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=1)
    if pids and cleanup is not None:
        cleanup(state)
    forget_pid(name)
    return bool(pids)


# --- network --------------------------------------------------------------------------------------------

def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return 200 <= r.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Servers bind with SO_REUSEADDR; without it, connections in TIME_WAIT would look like a busy port.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_ports(n: int, avoid: Container[int] = ()) -> list[int]:
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


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
