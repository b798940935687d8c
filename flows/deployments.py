"""Registering the flows as Prefect deployments on a work pool (what `squeezeflow deploy` does).

A process pool runs flow runs as subprocesses of `prefect worker start --pool <pool>` on the machine that
holds this checkout; the deployment's code is pulled from the checkout (`from_source`), so the worker
runs exactly the code that was deployed. infra/prefect.yaml describes the same deployments for
`prefect deploy`.

Three deployments: `compress/compress` and `sweep/sweep` (run on demand, from the UI's form or the API),
and `recalibrate-nightly/recalibrate-nightly` on a cron schedule (02:00 every night by default).
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_POOL = "squeezeflow-process"
DEFAULT_NIGHTLY_CRON = "0 2 * * *"


@dataclass(frozen=True)
class DeploymentSpec:
    name: str          # deployment name; equal to the flow's name, so the UI shows compress/compress
    entrypoint: str    # relative to the repository root
    description: str


COMPRESS = DeploymentSpec("compress", "flows/compress.py:compress_flow",
                          "Compress one model with one recipe; cached stages, published to the S3 registry.")
SWEEP = DeploymentSpec("sweep", "flows/sweep.py:sweep_flow",
                       "Many recipes on one model in one run: shared calibration and statistics, one comparison table.")
RECALIBRATE = DeploymentSpec("recalibrate-nightly", "flows/recalibrate.py:recalibrate_flow",
                             "Nightly: recalibrate and recompress the registry's models on fresh calibration text.")
ALL = (COMPRESS, SWEEP, RECALIBRATE)


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


def missing_entrypoint(spec: DeploymentSpec) -> str | None:
    """Why `spec` cannot be deployed from this checkout (its file or function is missing), or None."""
    path, func = spec.entrypoint.split(":")
    file = REPO_ROOT / path
    if not file.is_file():
        return f"{path} does not exist in {REPO_ROOT}"
    if f"def {func}(" not in file.read_text(encoding="utf-8"):
        return f"{path} defines no {func}()"
    return None


def deploy(spec: DeploymentSpec, pool: str = DEFAULT_POOL, name: str | None = None,
           parameters: dict | None = None, cron: str | None = None) -> str:
    """Create or update one deployment on the process pool `pool` (created if missing); returns its id."""
    from prefect import flow

    ensure_process_pool(pool)
    remote = flow.from_source(source=str(REPO_ROOT), entrypoint=spec.entrypoint)
    # Prefect prints a summary table on stdout; stdout belongs to `squeezeflow --json`.
    with contextlib.redirect_stdout(sys.stderr):
        deployment_id = remote.deploy(name=name or spec.name, work_pool_name=pool, parameters=parameters or {},
                                      description=spec.description, cron=cron, build=False, push=False,
                                      print_next_steps=False, ignore_warnings=True)
    return str(deployment_id)


def deploy_compress(pool: str = DEFAULT_POOL, name: str = "compress", parameters: dict | None = None,
                    cron: str | None = None) -> str:
    """Create or update the `compress` deployment; returns its id."""
    return deploy(COMPRESS, pool, name, parameters, cron)


def deploy_all(pool: str = DEFAULT_POOL, cron: str | None = None,
               nightly_cron: str = DEFAULT_NIGHTLY_CRON) -> dict[str, dict]:
    """compress (on `cron` if given), sweep, and recalibrate-nightly on `nightly_cron`.

    Returns {deployment name: {"id": ..., "schedule": ...}}. Every entrypoint is checked before any is
    registered: a broken checkout gets one BadInput naming the missing flow, not a half-deployed set."""
    from squeezeflow.errors import BadInput

    for spec in ALL:
        if reason := missing_entrypoint(spec):
            raise BadInput(f"cannot deploy {spec.name}: {reason}")
    schedules = {COMPRESS.name: cron, SWEEP.name: None, RECALIBRATE.name: nightly_cron}
    return {spec.name: {"id": deploy(spec, pool, cron=schedules[spec.name]), "schedule": schedules[spec.name]}
            for spec in ALL}


def start_run(deployment: str, parameters: dict, job_variables: dict) -> dict:
    """A run of `deployment` ("flow/deployment") on the configured Prefect server, not waited for (what
    `squeezeflow submit` does once the plan has sized the pod); BadInput when no such deployment exists."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    from squeezeflow.errors import BadInput
    from squeezeflow.services import ensure_prefect

    api = ensure_prefect()
    try:
        run = run_deployment(deployment, parameters=parameters, job_variables=job_variables, timeout=0)
    except ObjectNotFound:
        raise BadInput(f"no deployment {deployment!r} on the Prefect server at {api}") from None
    return {"id": str(run.id), "name": run.name, "api_url": api}
