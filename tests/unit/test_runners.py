"""--runner / --dask-address validation, the local cluster spec, and which resources block tasks ask for.

No GPU here: the GPU branch is checked through the functions that decide it (worker spec, annotation),
and the annotation is checked against a real in-process Dask scheduler advertising a GPU resource.
"""
from __future__ import annotations

import socket

import pytest

from squeezeflow import runners
from squeezeflow.cli import main
from squeezeflow.errors import BadInput

pytest.importorskip("prefect_dask")


def test_default_runner_needs_nothing():
    assert runners.parse_runner(None) == runners.RunnerSpec()
    assert runners.parse_runner("default") == runners.RunnerSpec()
    assert runners.task_runner(runners.RunnerSpec()) is None


@pytest.mark.parametrize("kind, address, workers, message", [
    ("ray", None, None, "unknown runner"),
    ("DASK", None, None, "unknown runner"),
    ("default", "tcp://127.0.0.1:8786", None, "need --runner dask"),
    ("default", None, 3, "need --runner dask"),
    ("dask", None, 0, "at least one worker"),
    ("dask", "tcp://127.0.0.1:8786", 2, "has its own workers"),
    ("dask", "http://127.0.0.1:8786", None, "expected tcp://host:port"),
    ("dask", "tcp://127.0.0.1", None, "expected tcp://host:port"),
    ("dask", "tcp://host:port", None, "expected tcp://host:port"),
    ("dask", "tcp://127.0.0.1:8786/x", None, "expected tcp://host:port"),
])
def test_bad_runner_flags_are_refused(kind, address, workers, message):
    with pytest.raises(BadInput, match=message):
        runners.parse_runner(kind, address, workers, check_reachable=False)


def test_address_normalized_and_implies_dask():
    spec = runners.parse_runner(None, "127.0.0.1:8786", check_reachable=False)
    assert spec == runners.RunnerSpec("dask", "tcp://127.0.0.1:8786")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_scheduler_is_one_line_exit_2(capsys):
    port = _closed_port()
    code = main(["compress", "some-model", "--recipe", "rtn-w4g64", "--dask-address", f"tcp://127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "no Dask scheduler reachable" in err, err


@pytest.mark.parametrize("argv", [["sweep", "m", "--recipes", "rtn-w4g64", "--runner", "spark"],
                                  ["compress", "m", "--recipe", "rtn-w4g64", "--runner", "default", "--dask-workers", "2"]])
def test_cli_runner_errors_are_one_line(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("squeezeflow: error: --") and err.count("\n") == 1, err


def test_reachable_scheduler_passes():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
        assert runners.parse_runner("dask", address) == runners.RunnerSpec("dask", address)


def test_local_cluster_cpu_spec():
    spec = runners.local_cluster_spec(gpus=0)
    workers = spec["workers"]
    assert len(workers) == runners.DEFAULT_CPU_WORKERS
    for w in workers.values():
        opts = w["options"]
        assert opts["nthreads"] == 1 and opts["host"] == "127.0.0.1" and "resources" not in opts
        assert "CUDA_VISIBLE_DEVICES" not in opts["pre_spawn_env"]
        assert opts["pre_spawn_env"]["OMP_NUM_THREADS"] == str(__import__("torch").get_num_threads())
    assert len(runners.local_cluster_spec(workers=3, gpus=0)["workers"]) == 3


def test_local_cluster_gpu_spec_pins_one_device_per_worker():
    workers = list(runners.local_cluster_spec(gpus=2)["workers"].values())
    assert len(workers) == 2  # one per device by default
    assert [w["options"]["pre_spawn_env"]["CUDA_VISIBLE_DEVICES"] for w in workers] == ["0", "1"]
    assert all(w["options"]["resources"] == {runners.GPU: 1} for w in workers)


def test_dask_runner_builds_the_local_cluster_or_connects():
    from prefect_dask import DaskTaskRunner

    local = runners.task_runner(runners.RunnerSpec("dask", workers=2))
    assert isinstance(local, DaskTaskRunner) and local.address is None
    assert "SpecCluster" in str(local.cluster_class) and len(local.cluster_kwargs["workers"]) == 2
    remote = runners.task_runner(runners.RunnerSpec("dask", "tcp://10.0.0.5:8786"))
    assert remote.address == "tcp://10.0.0.5:8786"

    from squeezeflow.flows.compress import compress_flow

    assert runners.with_runner(compress_flow, runners.RunnerSpec()) is compress_flow
    assert isinstance(runners.with_runner(compress_flow, runners.RunnerSpec("dask")).task_runner, DaskTaskRunner)


@pytest.mark.parametrize("workers, expected", [
    ([], {}),
    ([{}, {}], {}),
    ([{"GPU": 0}], {}),
    ([{"memory": 4e9}, {"GPU": 1}], {"GPU": 1}),
    ([{"GPU": 2.0}], {"GPU": 1}),  # one device per block, even on a worker that has two
])
def test_block_resources_only_when_some_worker_has_a_gpu(workers, expected):
    assert runners.block_resources(workers) == expected


def test_no_annotation_outside_dask():
    with runners.block_annotations() as resources:  # no flow run: the default runner
        assert resources == {}
    from prefect.task_runners import ThreadPoolTaskRunner

    assert runners.annotations_for(ThreadPoolTaskRunner()) == {}


class _FakeDaskRunner:
    """Stands in for prefect_dask.DaskTaskRunner: only `.client` is used to ask the cluster."""

    def __init__(self, client):
        self.client = client


_FakeDaskRunner.__module__ = "prefect_dask.task_runners"


@pytest.mark.parametrize("gpu_workers", [True, False])
def test_block_tasks_carry_the_gpu_annotation_to_the_scheduler(gpu_workers):
    """A real in-process scheduler: with GPU workers the submitted task is restricted to GPU=1; without,
    it is unrestricted (and so does not wait forever for a GPU that no worker has)."""
    from distributed import Client, LocalCluster

    kwargs = {"resources": {runners.GPU: 1}} if gpu_workers else {}
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None, **kwargs) as cluster, \
            Client(cluster) as client:
        with runners.block_annotations(_FakeDaskRunner(client)) as resources:
            future = client.submit(sum, [1, 2], key="block-0")
        assert future.result() == 3
        assert resources == ({runners.GPU: 1} if gpu_workers else {})
        task = cluster.scheduler.tasks.get("block-0")
        restrictions = task.resource_restrictions if task is not None else None
        assert (restrictions or {}) == resources
