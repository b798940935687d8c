"""Where the compress stage's per-block tasks run.

`default` is Prefect's own thread pool inside the flow process. `dask` hands every task the flow
*submits* (today: the per-block fan-out of layer-wise methods) to a Dask cluster through prefect-dask:
a temporary local cluster, or an existing scheduler given by address. Everything else the flow calls
directly (calibrate, saliency, pack, evaluate, publish) still runs in the flow process.

The runner only changes where a block is computed, never what: a block's inputs, cache key and output
bytes are the same on either runner (tests/integration/test_dask_runner.py checks it).

prefect-dask is an optional extra (`pip install squeezeflow[dask]`); this module imports it lazily so the
default runner never needs it.
"""
from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping
from urllib.parse import urlsplit

from .errors import BadInput

RUNNERS = ("default", "dask")
GPU = "GPU"  # the Dask resource name block tasks ask for, and local GPU workers advertise
DEFAULT_CPU_WORKERS = 2


@dataclass(frozen=True)
class RunnerSpec:
    kind: str = "default"
    address: str | None = None  # tcp://host:port of a running Dask scheduler; None = a local cluster
    workers: int | None = None  # local cluster size; None = one per CUDA device, else DEFAULT_CPU_WORKERS


def parse_runner(kind: str | None, address: str | None = None, workers: int | None = None,
                 check_reachable: bool = True) -> RunnerSpec:
    """Validate the CLI's --runner / --dask-address / --dask-workers before any server or model loads."""
    if address and kind is None:
        kind = "dask"  # an address only makes sense for Dask: don't make the user say it twice
    kind = kind or "default"
    if kind not in RUNNERS:
        raise BadInput(f"--runner {kind!r}: unknown runner (choose from {', '.join(RUNNERS)})")
    if kind != "dask":
        if address or workers is not None:
            raise BadInput("--dask-address / --dask-workers need --runner dask")
        return RunnerSpec()
    if address and workers is not None:
        raise BadInput("--dask-workers sizes a local cluster; the cluster at --dask-address has its own workers")
    if workers is not None and workers < 1:
        raise BadInput(f"--dask-workers {workers}: need at least one worker")
    _require_prefect_dask()
    if address:
        address = normalize_address(address)
        if check_reachable:
            check_scheduler(address)
    return RunnerSpec("dask", address, workers)


def _require_prefect_dask() -> None:
    try:
        import prefect_dask  # noqa: F401
    except ImportError:
        raise BadInput("--runner dask needs prefect-dask: pip install 'squeezeflow[dask]'") from None


def normalize_address(address: str) -> str:
    """`host:port` or `tcp://host:port` -> `tcp://host:port`; anything else is rejected here, not by a
    Dask connect that retries for its whole timeout."""
    url = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        port = url.port
    except ValueError:
        port = None
    if url.scheme != "tcp" or not url.hostname or port is None or url.path not in ("", "/"):
        raise BadInput(f"--dask-address {address!r}: expected tcp://host:port")
    return f"tcp://{url.hostname}:{port}" if ":" not in url.hostname else f"tcp://[{url.hostname}]:{port}"


def check_scheduler(address: str, timeout: float = 5.0) -> None:
    """A plain TCP connect to the scheduler: a wrong address fails in seconds with one line, before the
    flow starts (Dask's own client would retry for its connect timeout, then print a traceback)."""
    url = urlsplit(address)
    try:
        with socket.create_connection((url.hostname, url.port), timeout=timeout):
            pass
    except OSError as e:
        raise BadInput(f"--dask-address {address}: no Dask scheduler reachable ({e.strerror or e})") from None


def cuda_device_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - a broken CUDA install means "no GPUs" for scheduling purposes
        return 0


def _same_threads_env() -> dict[str, str]:
    """The flow process's intra-op thread count, for the workers. Dask's nanny would set OMP_NUM_THREADS=1;
    reductions (reconstruction errors stored in each block) sum in an order that depends on the thread
    count, so workers use the same count as the default runner and blocks stay byte-identical."""
    try:
        import torch

        n = str(torch.get_num_threads())
    except ImportError:
        n = os.environ.get("OMP_NUM_THREADS", "1")
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n}


def host_cores() -> int:
    """The cores this process may run on (its CPU affinity, a container's cpuset), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _shared_cores_env(workers: int, cores: int | None = None) -> dict[str, str]:
    """GPU workers split the host's cores: each gets cores ÷ workers intra-op threads (≥ 1), so N workers
    preparing blocks and copying them to their GPUs do not oversubscribe the CPU N times over. A GPU
    block's arithmetic runs on its device, where the host thread count changes no result."""
    n = str(max(1, (cores or host_cores()) // max(1, workers)))
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n}


def local_cluster_spec(workers: int | None = None, gpus: int | None = None,
                       cores: int | None = None) -> dict[str, Any]:
    """`distributed.SpecCluster` kwargs for a temporary cluster on this machine.

    One worker process per CUDA device running one task at a time, each seeing only its own device,
    advertising one GPU resource (block tasks ask for it, so a GPU never runs two blocks at once) and
    using cores ÷ workers intra-op threads (`cores`: default, this process's); without GPUs,
    DEFAULT_CPU_WORKERS CPU workers with the flow process's thread count (byte-identical blocks). Worker
    processes are spawned, not forked (Prefect's exit hooks break in forked children), and loopback-only:
    a local cluster serves nobody else.
    """
    gpus = cuda_device_count() if gpus is None else gpus
    n = workers or gpus or DEFAULT_CPU_WORKERS
    spec = {}
    for i in range(n):
        env = _shared_cores_env(n, cores) if gpus else _same_threads_env()
        options: dict[str, Any] = {"nthreads": 1, "host": "127.0.0.1"}
        if gpus:
            # Round-robin when asked for more workers than devices; each still reserves "its" GPU slot.
            env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
            options["resources"] = {GPU: 1}
        spec[f"squeezeflow-{'gpu' if gpus else 'cpu'}-{i}"] = {
            "cls": "squeezeflow.dask_nanny.PreSpawnNanny", "options": {**options, "pre_spawn_env": env}}
    return {"workers": spec, "name": "squeezeflow-local",
            "scheduler": {"cls": "distributed.Scheduler",
                          "options": {"host": "127.0.0.1", "dashboard": False, "dashboard_address": "127.0.0.1:0"}}}


def task_runner(spec: RunnerSpec):
    """The Prefect task runner for `spec`; None keeps the flow's own (the default thread pool)."""
    if spec.kind == "default":
        return None
    _require_prefect_dask()
    from prefect_dask import DaskTaskRunner

    if spec.address:
        return DaskTaskRunner(address=spec.address)
    return DaskTaskRunner(cluster_class="distributed.SpecCluster", cluster_kwargs=local_cluster_spec(spec.workers))


def with_runner(flow, spec: RunnerSpec):
    """`flow` as is for the default runner, else a copy that submits its tasks to `spec`'s runner."""
    runner = task_runner(spec)
    return flow if runner is None else flow.with_options(task_runner=runner)


# --- what block tasks ask the cluster for ---------------------------------------------------------

def block_resources(worker_resources: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Resources each block task reserves, given every worker's advertised resources.

    {GPU: 1} when some worker advertises a GPU: blocks then run only there, one per device. Nothing
    otherwise: a task that asks for a resource no worker has waits forever, so a CPU-only cluster gets
    plain, unannotated tasks.
    """
    return {GPU: 1} if any(float(r.get(GPU, 0)) >= 1 for r in worker_resources) else {}


def annotations_for(runner) -> dict[str, float]:
    """Resources block tasks ask of `runner`'s cluster; {} for the default runner or a CPU-only cluster."""
    if runner is None or not type(runner).__module__.startswith("prefect_dask"):
        return {}
    info = runner.client.scheduler_info(n_workers=-1)
    return block_resources(w.get("resources") or {} for w in info.get("workers", {}).values())


@contextlib.contextmanager
def block_annotations(runner=None) -> Iterator[dict[str, float]]:
    """Around the block fan-out: annotate the tasks submitted inside with the resources they need when
    the flow runs on Dask (`runner`, default: the current flow run's task runner); a no-op otherwise.
    Yields the resources used, {} for none."""
    if runner is None:
        from prefect.context import FlowRunContext

        ctx = FlowRunContext.get()
        runner = ctx.task_runner if ctx else None
    resources = annotations_for(runner)
    if not resources:
        yield {}
        return
    import dask

    with dask.annotate(resources=resources):
        yield resources
