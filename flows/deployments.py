"""Registering the flows as Prefect deployments on a work pool (what `squeezeflow deploy` does).

A process pool runs flow runs as subprocesses of `prefect worker start --pool <pool>` on the machine that
holds this checkout; the deployment's code is pulled from the checkout (`from_source`), so the worker
runs exactly the code that was deployed. infra/prefect.yaml describes the same deployment for
`prefect deploy`.
"""
from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_POOL = "squeezeflow-process"


def ensure_process_pool(name: str = DEFAULT_POOL) -> None:
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(
                name=name, type="process", base_job_template=ProcessWorker.get_default_base_job_template()))


def deploy_compress(pool: str = DEFAULT_POOL, name: str = "compress", parameters: dict | None = None,
                    cron: str | None = None) -> str:
    """Create or update the `compress` deployment; returns its id."""
    from prefect import flow

    ensure_process_pool(pool)
    remote = flow.from_source(source=str(REPO_ROOT), entrypoint="flows/compress.py:compress_flow")
    deployment_id = remote.deploy(name=name, work_pool_name=pool, parameters=parameters or {},
                                  cron=cron, build=False, push=False, print_next_steps=False)
    return str(deployment_id)
