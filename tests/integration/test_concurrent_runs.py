"""Two identical compress runs at once, sharing one artifact store and one registry: both complete,
publish the same artifact (same id, one registry entry), and every object in the shared store still
matches its content address."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import uuid

import pytest

from prefect_fixtures import _RUN_FLOW, prefect_server, shared_inputs, tiny_llama, worker_env  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def test_two_identical_runs_at_once_share_the_cache_safely(prefect_server, s3_server, tiny_llama, tmp_path):
    from squeezeflow.registry import Registry

    registry = f"s3://{s3_server['bucket']}/concurrent-{uuid.uuid4().hex[:8]}"
    store = tmp_path / "store"
    params = {"model": {"ref": str(tiny_llama)}, "recipe": "rtn-w4g64", "calibration": {"n_samples": 4, "seqlen": 64},
              "evaluation": {"seqlen": 64, "max_windows": 2}, "destinations": {"store": str(store), "registry": registry}}
    procs = []
    for i in range(2):
        d = tmp_path / f"run{i}"
        d.mkdir()
        procs.append((d, subprocess.Popen([sys.executable, "-c", _RUN_FLOW, json.dumps(params), str(d / "result.json"),
                                           "squeezeflow.flows.compress:compress_flow"], cwd=d, env=worker_env(),
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)))
    outs = []
    for d, p in procs:
        log = p.communicate(timeout=500)[0].decode(errors="replace")
        out = json.loads((d / "result.json").read_text()) if (d / "result.json").is_file() else None
        assert p.returncode == 0 and out and out["completed"], log[-4000:]
        outs.append(out["result"]["artifact"])
    assert outs[0]["artifact_id"] == outs[1]["artifact_id"] and outs[0]["store_ref"] == outs[1]["store_ref"]
    entries = Registry(registry).list()
    assert [e["artifact_id"] for e in entries] == [outs[0]["artifact_id"]]
    objects = [p for p in (store / "objects").rglob("*") if p.is_file()]
    assert objects and not [p for p in objects if p.name.startswith(".tmp-")]
    assert [p.name for p in objects if hashlib.sha256(p.read_bytes()).hexdigest() != p.name] == []
