"""Fault matrix: a `kill -9` of the flow process at every stage, one after another, loses nothing.

The same compress flow (tiny Llama, publish to the real SeaweedFS registry, real Prefect server) is run
in a child interpreter that SIGKILLs itself right after that task's stage has written and remembered its
outputs, before Prefect records it complete (tests/integration/fault_flows.install_kill_after). The next
run, same parameters, must resume past it (its outputs come back Cached) and die at the next stage; the
last run, with no fault, completes. Its artifact must be byte-identical, file by file, to the artifact of
an uninterrupted run into a fresh store and registry, and the registry must hold exactly that one entry.
"""
from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from prefect_fixtures import (  # noqa: F401  (fixtures are used by name)
    _RUN_FLOW,
    prefect_server,
    read_task_runs,
    run_flow_in_child,
    shared_inputs,
    task_name,
    tiny_llama,
    worker_env,
)
from sf_testing import tally

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

# The six stages; `assemble` (writing manifest + report) belongs to publish and is killed separately.
KILL_AFTER = ["calibrate", "statistics", "compress", "pack", "evaluate", "assemble", "publish"]


def params(model: Path, store: Path, registry: str) -> dict:
    return {"model": {"ref": str(model)}, "recipe": "rtn-w4g64", "calibration": {"n_samples": 4, "seqlen": 64},
            "evaluation": {"seqlen": 64, "max_windows": 2}, "destinations": {"store": str(store), "registry": registry}}


def run_killed(p: dict, workdir: Path, task: str) -> subprocess.CompletedProcess:
    workdir.mkdir(parents=True)
    return subprocess.run([sys.executable, "-c", _RUN_FLOW, json.dumps(p), str(workdir / "result.json"),
                           "squeezeflow.flows.compress:compress_flow", task, str(Path(__file__).parent)],
                          cwd=workdir, capture_output=True, env=worker_env(), timeout=300)


def digest(root: Path) -> dict[str, str]:
    return {f.relative_to(root).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(root.rglob("*")) if f.is_file() and f.name != ".squeezeflow-complete"}


def test_kill_9_at_every_stage_then_resume_gives_the_same_artifact(prefect_server, s3_server, tiny_llama, tmp_path):
    from squeezeflow.registry import Registry

    tag = uuid.uuid4().hex[:8]
    registry = f"s3://{s3_server['bucket']}/faults-{tag}"
    p = params(tiny_llama, tmp_path / "store", registry)
    for i, task in enumerate(KILL_AFTER):
        proc = run_killed(p, tmp_path / f"killed-{i}-{task}", task)
        ok = proc.returncode == -signal.SIGKILL
        tally("kill -9 stages resumed byte-identically", ok)
        assert ok, f"kill after {task}: exit {proc.returncode}\n{proc.stderr.decode(errors='replace')[-4000:]}"
        if task == "assemble":  # nothing of this run reached the registry
            assert Registry(registry).list() == []

    final = run_flow_in_child(p, tmp_path / "final")
    states = {task_name(tr): tr.state.name for tr in read_task_runs(final["flow_run_id"]) if tr.state}
    assert all(states.get(t) == "Cached" for t in ("calibrate", "statistics", "compress", "pack", "evaluate",
                                                 "assemble")), states
    entries = Registry(registry).list()
    assert len(entries) == 1 and entries[0]["artifact_id"] == final["result"]["artifact"]["artifact_id"], entries
    resumed = digest(Registry(registry).pull(entries[0]["uri"], tmp_path / "resumed"))

    clean = run_flow_in_child(params(tiny_llama, tmp_path / "store-fresh", f"{registry}-fresh"), tmp_path / "clean")
    fresh = digest(Registry(f"{registry}-fresh").pull(clean["result"]["artifact"]["uri"], tmp_path / "fresh"))
    assert "model.safetensors" in resumed and resumed == fresh
    tally("kill -9 stages resumed byte-identically", True)  # the final, uninterrupted comparison


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_or_sigint_mid_compress_keeps_every_finished_stage(sig, prefect_server, s3_server, tiny_llama,
                                                                  tmp_path):
    """A run stopped politely (SIGTERM from Kubernetes, Ctrl-C) loses nothing it finished: the rerun finds
    calibrate, statistics and the finished blocks in the store, whatever Prefect recorded."""
    import os
    import time

    from prefect_fixtures import wait_for

    here = Path(__file__).parent
    store = tmp_path / "store"
    p = params(tiny_llama, store, f"s3://{s3_server['bucket']}/signals-{uuid.uuid4().hex[:8]}")
    env = worker_env(SQUEEZEFLOW_TEST_COMPRESS_DELAY_S="4")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(here), env.get("PYTHONPATH")]))
    (tmp_path / "first").mkdir()
    with open(tmp_path / "first" / "run.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", _RUN_FLOW, json.dumps(p), str(tmp_path / "first" / "out.json"),
                                 "fault_flows:compress_flow"], cwd=tmp_path / "first", env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            def a_block_done():
                assert proc.poll() is None, (tmp_path / "first" / "run.log").read_text(errors="replace")[-4000:]
                return [k for k in (store / "index").glob("compress-*")] or None

            wait_for(a_block_done, timeout=600, interval=0.2, what="a compressed block in the store")
            proc.send_signal(sig)
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    done_before = len(list((store / "index").glob("compress-*")))
    assert not (tmp_path / "first" / "out.json").exists() or "completed\": false" in \
        (tmp_path / "first" / "out.json").read_text(), "the run finished before the signal: nothing was tested"

    started = time.monotonic()
    again = run_flow_in_child(p, tmp_path / "again")
    runs = read_task_runs(again["flow_run_id"])
    states: dict[str, list[str]] = {}
    for tr in runs:
        states.setdefault(task_name(tr), []).append(tr.state.name if tr.state else "NONE")
    ok = (states.get("calibrate") == ["Cached"] and states.get("statistics") == ["Cached"]
          and states.get("compress", []).count("Cached") >= done_before >= 1)
    tally("resume after SIGTERM / SIGINT reuses finished stages", ok)
    assert ok, (done_before, states, round(time.monotonic() - started, 1))
