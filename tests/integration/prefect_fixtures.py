"""Fixtures and helpers for integration tests that need a real Prefect server and a real worker.

Import the fixtures into a test module (`from .prefect_fixtures import prefect_server, tiny_llama, ...`).
They build on `s3_server` from conftest.py (one SeaweedFS per session, every squeezeflow location in a
pytest temp dir), and add:

- `shared_inputs`: SQUEEZEFLOW_MODELS / SQUEEZEFLOW_CORPORA point at the default shared cache, so the
  prepared SmolLM2 and the corpora are reused rather than rebuilt in every temp dir;
- `prefect_server`: the embedded Prefect server started with `services.ensure_prefect()`, exactly as the
  CLI does, under the session's temp services dir (so PREFECT_HOME, the SQLite database and the local
  result storage are temporary too), on a free port rather than 4200;
- `tiny_llama`: a 4-block random Llama with the SmolLM2 tokenizer, saved as safetensors;
- `ProcessWorker`: `prefect worker start --type process` as a subprocess with its log in a file;
- helpers to poll the API and to find (and kill) the process that executes a given flow run.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from squeezeflow import services
from sf_testing import EnvSnapshot, make_tiny_llama

SHARED_CACHE = Path.home() / ".cache" / "squeezeflow"
TINY_LAYERS = 4


def _refresh_prefect_settings() -> None:
    if "prefect.context" in sys.modules:
        sys.modules["prefect.context"].refresh_global_settings_context()


def _drain_prefect_workers() -> None:
    """Flush this process's queued logs and events to the server before it stops (as
    prefect_test_harness does); otherwise they are retried against a dead server at interpreter exit."""
    if "prefect" not in sys.modules:
        return
    import inspect

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain() -> None:
        try:
            result = APILogWorker.instance().drain()
            if inspect.isawaitable(result):
                await result
        except RuntimeError:  # never started
            pass
        result = EventsWorker.drain_all()
        if inspect.isawaitable(result):
            await result

    with contextlib.suppress(Exception):
        run_coro_as_sync(drain())


@pytest.fixture(scope="session")
def shared_inputs(s3_server: dict) -> Iterator[dict[str, Path]]:
    """Models and corpora from the shared cache (prepared once per machine); everything else stays temp."""
    snapshot = EnvSnapshot()
    models = Path(os.environ.get("SQUEEZEFLOW_MODELS") or SHARED_CACHE / "models")
    corpora = Path(os.environ.get("SQUEEZEFLOW_CORPORA") or SHARED_CACHE / "corpora")
    os.environ["SQUEEZEFLOW_MODELS"] = str(models)
    os.environ["SQUEEZEFLOW_CORPORA"] = str(corpora)
    try:
        yield {"models": models, "corpora": corpora}
    finally:
        snapshot.restore()


@pytest.fixture(scope="session")
def prefect_server(s3_server: dict) -> Iterator[dict[str, Any]]:
    """A real `prefect server start` process (PREFECT_API_URL and PREFECT_HOME exported here).

    A separate worker process can connect to it, which `prefect_test_harness` cannot offer as simply.
    Stopped (process group SIGTERM, then SIGKILL) at the end of the session.
    """
    snapshot = EnvSnapshot()
    for var in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILE", "PREFECT_HOME"):
        os.environ.pop(var, None)
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    # services._start_prefect prefers port 4200, where a developer's own server usually listens; a
    # remembered port that is free wins, so hand it a free one. (Internal API: the state file format.)
    if not services._read_state("prefect").get("ports"):
        (port,) = services._free_ports(1)
        services._write_state("prefect", {"ports": {"api": port}})
    try:
        started = time.monotonic()
        url = services.ensure_prefect(timeout=150)
        info = {"url": url, "home": Path(os.environ["PREFECT_HOME"]), "startup_s": time.monotonic() - started,
                "log": services._log_path("prefect")}
        print(f"\n[prefect] server {url} healthy after {info['startup_s']:.1f} s (home {info['home']})")
        yield info
    finally:
        try:
            _drain_prefect_workers()
            services.stop("prefect")
        finally:
            snapshot.restore()
            _refresh_prefect_settings()


@pytest.fixture(scope="session")
def tiny_llama(shared_inputs: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 4-block Llama (hidden 64) with the SmolLM2 tokenizer, as an HF safetensors directory."""
    from squeezeflow.models import prepare_model

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "tiny-llama", prepare_model("smollm2-135m").path,
                           num_layers=TINY_LAYERS)


# --- worker ---------------------------------------------------------------------------------------

class ProcessWorker:
    """`prefect worker start --pool POOL --type process` in its own process group, logging to a file."""

    def __init__(self, pool: str, log: Path, env: dict[str, str], cwd: Path):
        self.pool, self.log_path = pool, log
        self._log = open(log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process",
             "--name", f"{pool}-worker"],
            cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the worker's process group (the worker and any flow run it still runs), then SIGKILL."""
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=wait)
                    break
        self._log.close()


def worker_env(**extra: str) -> dict[str, str]:
    """This process's environment (API URL, PREFECT_HOME, S3 endpoint + credentials, SQUEEZEFLOW_*), plus
    fast polling so the test does not wait on the worker's 10 s default."""
    env = dict(os.environ)
    env.update(PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="5",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def create_process_pool(name: str) -> None:
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker as PrefectProcessWorker

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(
            name=name, type="process", base_job_template=PrefectProcessWorker.get_default_base_job_template()),
            overwrite=True)


# --- polling the API ------------------------------------------------------------------------------

def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.5, what: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy; TimeoutError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def read_flow_run(flow_run_id):
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def read_task_runs(flow_run_id) -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def task_name(task_run) -> str:
    """The task's name (`compress`, `calibrate`, ...) from a task-run name such as `compress-3f2`."""
    return task_run.name.rsplit("-", 1)[0]


def states_by_task(task_runs: list) -> dict[str, list[str]]:
    """{task name: sorted ['<TYPE>/<state name>', ...]} for a readable assertion message."""
    out: dict[str, list[str]] = {}
    for tr in task_runs:
        state = tr.state
        out.setdefault(task_name(tr), []).append(f"{state.type.value}/{state.name}" if state else "NONE")
    return {k: sorted(v) for k, v in sorted(out.items())}


# --- the process that executes a flow run ---------------------------------------------------------

def flow_run_pids(flow_run_id) -> list[int]:
    """Pids of processes whose environment carries PREFECT__FLOW_RUN_ID=<id> (the process worker sets it
    on the `python -m prefect.engine` child it starts for the run)."""
    needle = f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            pids.append(int(entry.name))
    return sorted(pids)


def stop_worker_and_runs(worker, run_ids) -> None:
    """Stop the worker, then kill its flow runs' processes: they get their own session, so stopping the
    worker does not reach them."""
    if worker is not None:
        worker.stop()
    for run_id in [r for r in run_ids if r]:
        for pid in flow_run_pids(run_id):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


# --- running a flow outside pytest's process ------------------------------------------------------

# Prefect 3.8.8 registers exit hooks in any process that ran a flow; a child forked from such a process
# later exits with status 1 (the hook's state is reset by fork). Tests therefore run flows in a fresh
# interpreter, so pytest's own process never hosts a flow run.
_RUN_FLOW = """
import importlib, json, sys
if len(sys.argv) > 4:  # test-only fault injection: SIGKILL after the named task's stage has run
    sys.path.insert(0, sys.argv[5])
    importlib.import_module("fault_flows").install_kill_after(sys.argv[4])
module, name = sys.argv[3].split(":")
state = getattr(importlib.import_module(module), name)(**json.loads(sys.argv[1]), return_state=True)
out = {"completed": state.is_completed(), "state": repr(state), "flow_run_id": str(state.state_details.flow_run_id),
       "result": state.result() if state.is_completed() else None}
with open(sys.argv[2], "w") as f:
    json.dump(out, f)
"""


def run_flow_in_child(params: dict, workdir: Path, timeout: float = 300,
                      flow: str = "squeezeflow.flows.compress:compress_flow") -> dict:
    """Run flow(**params) in a child interpreter with this process's environment; returns
    {"completed", "state", "flow_run_id", "result"} and fails with the child's log if it did not complete."""
    import json

    workdir.mkdir(parents=True, exist_ok=True)
    result_file, log_file = workdir / "result.json", workdir / "run.log"
    with open(log_file, "wb") as log:
        proc = subprocess.run([sys.executable, "-c", _RUN_FLOW, json.dumps(params), str(result_file), flow],
                              cwd=workdir, env=worker_env(), stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    out = json.loads(result_file.read_text()) if result_file.is_file() else None
    assert proc.returncode == 0 and out and out["completed"], \
        f"flow run failed ({out and out['state']}):\n{log_file.read_text(errors='replace')[-8000:]}"
    return out
