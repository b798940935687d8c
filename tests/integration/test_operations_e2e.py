"""Operations end to end: `squeezeflow deploy`'s code registers the deployments on a process pool, a real
`prefect worker` picks up a run created through the REST call the UI's "Run" form makes, the run publishes
to the real SeaweedFS registry, and its progress artifact climbs to 100 %.

1. deploy_all() (what `squeezeflow deploy` calls) on a fresh pool; a worker on that pool.
2. POST {api}/deployments/{id}/create_flow_run with the form's parameters (httpx, no Prefect client).
3. While it runs, poll the run's progress artifact: its values never go down and end at 100.
4. The run is COMPLETED, its table artifact is there, and the registry holds exactly one entry for the
   tiny model and recipe, which pulls back with its manifest.
"""
from __future__ import annotations

import time
import uuid

import httpx
import pytest

from prefect_fixtures import (  # noqa: F401  (fixtures are used by name)
    ProcessWorker,
    stop_worker_and_runs,
    prefect_server,
    shared_inputs,
    tiny_llama,
    wait_for,
    worker_env,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

RECIPE = "rtn-w4g64"


def form_parameters(model, store, registry: str, recipe: str = RECIPE) -> dict:
    """What the UI's custom-run form sends for a small run on the tiny model."""
    return {
        "model": {"ref": str(model)},
        "recipe": recipe,
        "calibration": {"source": "sotu-calib", "n_samples": 4, "seqlen": 64},
        "evaluation": {"seqlen": 64, "max_windows": 2},
        "destinations": {"store": str(store), "registry": registry},
    }


def run_artifacts(api: str, flow_run_id: str, kind: str | None = None) -> list[dict]:
    body = {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}
    if kind:
        body["artifacts"]["type"] = {"any_": [kind]}
    r = httpx.post(f"{api}/artifacts/filter", json=body, timeout=30)
    r.raise_for_status()
    return r.json()


def test_ui_rest_call_runs_compress_on_the_worker_and_publishes(s3_server, shared_inputs, prefect_server,
                                                                  tiny_llama, tmp_path):
    from squeezeflow.flows.deployments import deploy_all
    from squeezeflow.registry import Registry

    api = prefect_server["url"]
    tag = uuid.uuid4().hex[:8]
    pool = f"ops-{tag}"
    registry_uri = f"s3://{s3_server['bucket']}/test-ops-{tag}"
    t0 = time.monotonic()
    deployments = deploy_all(pool=pool)
    assert {"compress", "sweep"} <= {k for k, v in deployments.items() if "id" in v}, deployments
    worker = ProcessWorker(pool, tmp_path / "worker.log", cwd=tmp_path, env=worker_env())
    run_id = None
    try:
        r = httpx.post(f"{api}/deployments/{deployments['compress']['id']}/create_flow_run",
                       json={"parameters": form_parameters(tiny_llama, tmp_path / "store", registry_uri)}, timeout=30)
        assert r.status_code == 201, r.text
        run_id = r.json()["id"]

        seen: list[float] = []

        def finished():
            assert worker.alive(), f"worker exited:\n{worker.log()[-4000:]}"
            for a in run_artifacts(api, run_id, "progress"):
                if not seen or a["data"] != seen[-1]:
                    seen.append(a["data"])
            state = httpx.get(f"{api}/flow_runs/{run_id}", timeout=30).json()["state"]
            return state if state and state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

        state = wait_for(finished, timeout=300, interval=0.5, what=f"flow run {run_id} to finish")
        assert state["type"] == "COMPLETED", f"{state}\n{worker.log()[-8000:]}"
        print(f"\n[ops] run {run_id} completed in {time.monotonic() - t0:.1f} s; progress seen {seen}")

        progress = run_artifacts(api, run_id, "progress")
        assert len(progress) == 1 and progress[0]["data"] == 100, progress
        assert progress[0]["key"] == f"compress-progress-{RECIPE}"
        assert seen == sorted(seen), f"progress went backwards: {seen}"
        keys = {a["key"] for a in run_artifacts(api, run_id)}
        assert f"compress-{RECIPE}" in keys, keys

        entries = Registry(registry_uri).list()
        assert len(entries) == 1, entries
        assert entries[0]["recipe"] == RECIPE, entries[0]
        pulled = Registry(registry_uri).pull(entries[0]["uri"], tmp_path / "pulled")
        assert (pulled / "manifest.json").is_file() and (pulled / "model.safetensors").is_file()
    except BaseException:
        print(f"\n[ops] ---- worker log ----\n{worker.log()[-20000:]}")
        raise
    finally:
        stop_worker_and_runs(worker, [run_id])
