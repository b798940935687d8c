"""Crash and resume under a real Prefect server, a real process worker and the real SeaweedFS registry.

1. Deploy `compress_flow` from source to a process work pool and start `prefect worker start`.
2. Run it on a tiny random Llama (4 blocks) with a 2 s fault-injection delay after each compressed block;
   as soon as the API shows at least one (not every) compress task COMPLETED, SIGKILL the flow run's
   process. The worker must report the run CRASHED; it must never be COMPLETED.
3. A new run of the deployment with the same parameters resumes: the blocks finished before the kill,
   and calibrate / statistics, come back as `Cached`, the rest run, and the run completes.
4. The same flow called directly (`compress_flow(...)`, no deployment or worker; in a child interpreter so
   that pytest's own process never hosts a flow run), uninterrupted, into a fresh store (nothing cached)
   and a fresh registry prefix, gives a byte-identical artifact (every file's sha256, manifest.json
   included) and the same artifact id.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import time
import uuid
from pathlib import Path

import pytest

from prefect_fixtures import (  # noqa: F401  (fixtures are used by name)
    TINY_LAYERS,
    ProcessWorker,
    create_process_pool,
    flow_run_pids,
    stop_worker_and_runs,
    prefect_server,
    run_flow_in_child,
    read_flow_run,
    read_task_runs,
    shared_inputs,
    states_by_task,
    task_name,
    tiny_llama,
    wait_for,
    worker_env,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[2]
FAULT_DELAY_S = "2"
CRASH_WAIT_S = 60


def tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def json_diff(a, b, path: str = "", limit: int = 20) -> list[str]:
    """Paths where two JSON documents differ, with both values (shortened)."""
    out: list[str] = []
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(a.keys() | b.keys()):
            out += json_diff(a.get(k, "<missing>"), b.get(k, "<missing>"), f"{path}.{k}", limit)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            out += json_diff(x, y, f"{path}[{i}]", limit)
    elif a != b:
        out.append(f"{path or '.'}: {str(a)[:120]!r} != {str(b)[:120]!r}")
    return out[:limit]


def run_params(model: Path, store: Path, registry: str) -> dict:
    return {
        "model": {"ref": str(model)},
        "recipe": "rtn-w4g64",
        "calibration": {"n_samples": 4, "seqlen": 64},
        "evaluation": {"seqlen": 64, "max_windows": 2},
        "destinations": {"store": str(store), "registry": registry},
    }


def settled_task_runs(flow_run_id, n_compress: int = TINY_LAYERS, timeout: float = 30) -> list:
    """The run's task runs once every one is final and all compress tasks are there (task states reach
    the server through events, so they can trail the flow run's own state by a moment)."""
    def ready():
        trs = read_task_runs(flow_run_id)
        n = sum(1 for tr in trs if task_name(tr) == "compress")
        return trs if n == n_compress and all(tr.state and tr.state.is_final() for tr in trs) else None

    return wait_for(ready, timeout=timeout, what=f"the task runs of flow run {flow_run_id} to settle")


def test_killed_run_resumes_from_cache_and_matches_uninterrupted_run(
        s3_server, shared_inputs, prefect_server, tiny_llama, tmp_path):
    from prefect import flow, get_client
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment
    from prefect.states import Crashed

    from squeezeflow.registry import Registry
    from squeezeflow.store import Ref, open_store

    t0 = time.monotonic()
    tag = uuid.uuid4().hex[:8]
    pool, deployment = f"resume-{tag}", f"resume-{tag}"
    registry_uri = f"s3://{s3_server['bucket']}/test-resume-{tag}"
    store = tmp_path / "store"
    params = run_params(tiny_llama, store, registry_uri)
    timeline: list[str] = []
    worker: ProcessWorker | None = None
    flow_run_ids: list = []

    def mark(what: str) -> None:
        timeline.append(f"{time.monotonic() - t0:6.1f} s  {what}")
        print(f"[resume] {timeline[-1]}", flush=True)

    def worker_alive() -> None:
        assert worker.alive(), f"the worker exited with status {worker.proc.returncode}"

    try:
        create_process_pool(pool)
        deployment_id = flow.from_source(source=str(REPO), entrypoint="tests/integration/fault_flows.py:compress_flow").deploy(
            name=deployment, work_pool_name=pool, ignore_warnings=True, print_next_steps=False)
        mark(f"deployed compress/{deployment} ({deployment_id}) to process pool {pool}")

        # One compress task at a time, so the kill lands between blocks rather than after all of them.
        worker = ProcessWorker(pool, tmp_path / "worker.log", cwd=tmp_path, env=worker_env(
            SQUEEZEFLOW_TEST_COMPRESS_DELAY_S=FAULT_DELAY_S, PREFECT_TASK_RUNNER_THREAD_POOL_MAX_WORKERS="1"))

        # --- run 1: killed mid-compress -------------------------------------------------------------
        first = run_deployment(f"compress/{deployment}", parameters=params, timeout=0)
        flow_run_ids.append(first.id)
        mark(f"run 1 {first.id} created")

        def compress_progress():
            worker_alive()
            state = read_flow_run(first.id).state
            assert state is None or not state.is_final(), f"run 1 ended before the kill: {state!r}"
            done = [tr for tr in read_task_runs(first.id)
                    if task_name(tr) == "compress" and tr.state and tr.state.type == StateType.COMPLETED]
            return done or None

        done = wait_for(compress_progress, timeout=150, interval=0.2, what="a COMPLETED compress task in run 1")
        pids = flow_run_pids(first.id)
        assert pids, f"no process carries PREFECT__FLOW_RUN_ID={first.id}"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        mark(f"SIGKILLed pids {pids} with {len(done)}/{TINY_LAYERS} compress tasks COMPLETED")
        assert len(done) < TINY_LAYERS, "every block finished before the kill; nothing left to resume"

        def crashed():
            state = read_flow_run(first.id).state
            assert state.type != StateType.COMPLETED, "run 1 completed although its process was killed"
            return state if state.is_final() else None

        forced = False
        try:
            state1 = wait_for(crashed, timeout=CRASH_WAIT_S, interval=0.5, what="run 1 to be marked CRASHED")
        except TimeoutError:
            with get_client(sync_client=True) as client:
                client.set_flow_run_state(first.id, Crashed(message="killed by the test"), force=True)
            state1, forced = read_flow_run(first.id).state, True
        mark(f"run 1 is {state1.type.value} ({state1.name}) {time.monotonic() - killed_at:.1f} s after the kill"
             + (" (FORCED by the test: the worker did not report it)" if forced else ""))
        assert state1.type == StateType.CRASHED, state1
        assert not forced, f"the worker did not mark the killed run CRASHED within {CRASH_WAIT_S} s"
        # What the API saw complete in run 1. A block may also have finished without its event reaching
        # the server before the kill, so this is a lower bound for what the resume reuses.
        completed_before = sum(1 for tr in read_task_runs(first.id) if task_name(tr) == "compress"
                               and tr.state and tr.state.type == StateType.COMPLETED)

        # --- run 2: same parameters, no delay; resumes from the cached tasks -------------------------
        second = run_deployment(f"compress/{deployment}", parameters=params, timeout=0,
                                job_variables={"env": {"SQUEEZEFLOW_TEST_COMPRESS_DELAY_S": "0"}})
        flow_run_ids.append(second.id)
        mark(f"run 2 {second.id} created")

        def finished():
            worker_alive()
            state = read_flow_run(second.id).state
            return state if state and state.is_final() else None

        state2 = wait_for(finished, timeout=180, interval=1.0, what="run 2 to finish")
        mark(f"run 2 is {state2.type.value} ({state2.name})")
        assert state2.type == StateType.COMPLETED, state2

        runs2 = settled_task_runs(second.id)
        states = states_by_task(runs2)
        mark(f"run 2 task states {states}")
        compress2 = [tr for tr in runs2 if task_name(tr) == "compress"]
        cached = [tr for tr in compress2 if tr.state.name == "Cached"]
        executed = [tr for tr in compress2 if tr.state.name == "Completed"]
        assert all(tr.state.type == StateType.COMPLETED for tr in compress2), states
        assert completed_before <= len(cached) < TINY_LAYERS, (completed_before, states)
        assert len(cached) + len(executed) == TINY_LAYERS, states
        for stage in ("calibrate", "statistics"):
            assert states.get(stage) == ["COMPLETED/Cached"], states
        mark(f"resume reused {len(cached)}/{TINY_LAYERS} compress blocks (API saw {completed_before} "
             f"completed before the kill); calibrate + statistics Cached")
        worker.stop()

        registry = Registry(registry_uri)
        entries = registry.list()
        assert len(entries) == 1, entries
        resumed_id = entries[0]["artifact_id"]
        resumed_dir = registry.pull(entries[0]["uri"], tmp_path / "pulled-resumed")

        # --- run 3: uninterrupted, fresh store and registry prefix: nothing cached ----------------------
        # compress_flow called directly, but in a child interpreter: a flow run starts Prefect's log and
        # event services in its process, and with those any fork()ed child of pytest later exits 1.
        fresh_store, fresh_registry = tmp_path / "store-fresh", f"{registry_uri}-fresh"
        out3 = run_flow_in_child(run_params(tiny_llama, fresh_store, fresh_registry), tmp_path / "run3")
        result = out3["result"]
        runs3 = settled_task_runs(out3["flow_run_id"])
        assert not [tr for tr in runs3 if tr.state.name == "Cached"], \
            f"the fresh-store run reused a cache: {states_by_task(runs3)}"
        art = result["artifact"]
        mark(f"uninterrupted direct compress_flow() run (nothing cached) published {art['uri']}")

        fresh_dir = open_store(str(fresh_store)).materialize(Ref(**art["store_ref"]), tmp_path / "fresh-artifact")
        fresh_pulled = Registry(fresh_registry).pull(art["uri"], tmp_path / "pulled-fresh")
        want = tree_digest(resumed_dir)
        assert "manifest.json" in want and "model.safetensors" in want, sorted(want)
        for name, got_dir in (("fresh store", fresh_dir), ("fresh registry", fresh_pulled)):
            got = tree_digest(got_dir)
            diff = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
            assert not diff, (
                f"{name} artifact differs from the resumed run's in {diff}; manifest differences: "
                f"{json_diff(read_json(resumed_dir / 'manifest.json'), read_json(got_dir / 'manifest.json'))}")
        assert art["artifact_id"] == resumed_id, (art["artifact_id"], resumed_id)
        # The resumed run's own store holds the very same tree object (content-addressed).
        assert open_store(str(store)).exists(Ref(**art["store_ref"]))
        mark(f"artifacts byte-identical ({len(want)} files, id {resumed_id}); "
             f"total {time.monotonic() - t0:.0f} s")
    except BaseException:
        print("\n[resume] ---- timeline ----\n" + "\n".join(timeline))
        if worker is not None:
            print(f"\n[resume] ---- worker log ({worker.log_path}) ----\n{worker.log()[-20000:]}")
        raise
    finally:
        stop_worker_and_runs(worker, flow_run_ids)
