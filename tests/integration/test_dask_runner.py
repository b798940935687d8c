"""The Dask runner computes the same artifact as the default runner, and really computes it on Dask.

Two concurrent runs of the CLI's run path (`squeezeflow.cli.run_compress`, what `squeezeflow compress`
calls) of the layer-wise rtn-w4g64 on the tiny 4-block Llama, each into its own store so neither reuses
the other's cached tasks: the default runner, and `--runner dask --dask-address` against a 2-worker
cluster this test owns, built from the same spec `--runner dask` uses for its temporary local cluster
(its scheduler's task stream shows every block ran on one of those workers). Both must give the same
artifact id and the same packed bytes. (That `--runner dask` alone builds that local cluster is checked
in tests/unit/test_runners.py; a third full run here would double the test's time on a busy machine.)
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from prefect_fixtures import (  # noqa: F401  (fixtures are used by name)
    TINY_LAYERS,
    prefect_server,
    shared_inputs,
    tiny_llama,
    worker_env,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

RECIPE = "rtn-w4g64"  # layer-wise: one compress task per block, the fan-out Dask takes over

# A fresh interpreter per run (Prefect 3.8.8's exit hooks: see prefect_fixtures.run_flow_in_child).
# The lineage records the checkout's git commit; other work committed while this test runs would change
# it between runs, so the child pins it: everything else in the manifest must match.
_RUN = """
import json, sys
import squeezeflow.pipeline
squeezeflow.pipeline.git_commit = lambda: "fixed-for-this-test"
from squeezeflow.cli import run_compress
from squeezeflow.config import CalibrationSpec, EvalSpec, ModelRef
from squeezeflow.runners import parse_runner
model, store, out_file, kind, address = sys.argv[1:6]
out = run_compress(ModelRef(ref=model), [%r], CalibrationSpec(n_samples=2, seqlen=64),
                   EvalSpec(seqlen=64, max_windows=1), None, store, publish=False,
                   runner=parse_runner(kind, address or None))
json.dump(out[0], open(out_file, "w"))
""" % RECIPE


def start(model: Path, workdir: Path, kind: str, address: str = "") -> tuple[subprocess.Popen, Path]:
    workdir.mkdir(parents=True)
    log = open(workdir / "run.log", "wb")
    proc = subprocess.Popen([sys.executable, "-c", _RUN, str(model), str(workdir / "store"),
                             str(workdir / "result.json"), kind, address],
                            cwd=workdir, env=worker_env(), stdout=log, stderr=subprocess.STDOUT)
    log.close()  # the child holds its own descriptor
    return proc, workdir


def finish(run: tuple[subprocess.Popen, Path], timeout: float = 200) -> dict:
    proc, workdir = run
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (workdir / "run.log").read_text(errors="replace")
    out_file = workdir / "result.json"
    assert proc.returncode == 0 and out_file.is_file(), f"{workdir.name} run failed:\n{log[-6000:]}"
    return {**json.loads(out_file.read_text()), "store": str(workdir / "store"), "log": log}


def artifact_files(result: dict) -> dict[str, bytes]:
    from squeezeflow.store import Ref, open_store

    store = open_store(result["store"])
    tree = store.get_tree(Ref(**result["artifact"]["store_ref"]))
    return {path: store.get_bytes(ref) for path, ref in tree.items()}


@pytest.fixture
def dask_cluster(prefect_server):
    """Two single-threaded worker processes, started after the Prefect/S3 fixtures so they inherit the
    API URL, PREFECT_HOME (the shared result storage) and the S3 credentials."""
    from distributed import Client, SpecCluster

    from squeezeflow.runners import local_cluster_spec

    cluster = SpecCluster(**local_cluster_spec(workers=2, gpus=0))
    client = Client(cluster)
    try:
        client.get_task_stream()  # registers the scheduler's task-stream plugin before any task runs
        yield cluster, client
    finally:
        client.close()
        cluster.close()


def test_dask_runner_gives_byte_identical_artifact(prefect_server, tiny_llama, dask_cluster, tmp_path):
    cluster, client = dask_cluster
    # Concurrently, to keep the test short: separate stores, so no run can reuse another's cached tasks.
    runs = [start(tiny_llama, tmp_path / "default", "default"),
            start(tiny_llama, tmp_path / "dask-address", "dask", cluster.scheduler_address)]
    default, remote = [finish(r) for r in runs]

    # Every block task ran on one of the cluster's two workers (the flow process submits, never computes).
    stream = client.get_task_stream()
    names = {addr: w.get("name") for addr, w in client.scheduler_info(n_workers=-1)["workers"].items()}
    ran_on = [names.get(t["worker"], t["worker"]) for t in stream]
    assert len(stream) == TINY_LAYERS, stream
    assert set(ran_on) <= {"squeezeflow-cpu-0", "squeezeflow-cpu-1"}, ran_on

    assert remote["artifact"] == default["artifact"]  # same artifact id, same content address
    files = artifact_files(default)
    assert any(p.endswith(".safetensors") for p in files), sorted(files)  # the packed weights are compared too
    other = artifact_files(remote)
    assert sorted(other) == sorted(files)
    assert [p for p in files if other[p] != files[p]] == []
