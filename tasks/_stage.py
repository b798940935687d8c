"""How every stage task is configured: content-addressed caching, persisted JSON results, and retries
for transient failures only.

Cache key = the task's inputs (small pydantic refs and specs, hashed as JSON) + the task's source + the
stage version from squeezeflow.pipeline.STAGE_VERSIONS. The flow-run id is NOT part of it, so a new run
after a crash reuses every finished task. Results are serialized as JSON (never pickle).
"""
from __future__ import annotations

import errno
import functools
import os
import signal
from dataclasses import dataclass

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy

from squeezeflow.errors import BadInput, IntegrityError
from squeezeflow.pipeline import STAGE_VERSIONS


@dataclass
class StageVersion(CachePolicy):
    """Adds `<stage>:<version>` to the key, so a format change invalidates old results on purpose."""

    stage: str = ""

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs):
        return f"{self.stage}:{STAGE_VERSIONS[self.stage]}"


def is_transient(task, task_run, state) -> bool:
    """Retry network and storage hiccups; never configuration errors or integrity failures."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as e:  # noqa: BLE001 - classifying, not handling
            exc = e
    if isinstance(exc, (BadInput, IntegrityError, ValueError, TypeError, KeyError)):
        return False
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return False  # a full disk does not empty itself in seconds: fail now, resume after space is freed
    try:
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(exc, ClientError):
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            return status >= 500 or status == 429
        if isinstance(exc, BotoCoreError):
            return True
    except ImportError:
        pass
    return isinstance(exc, (OSError, ConnectionError, TimeoutError))


def fault_point(task_name: str) -> None:
    """Fault injection for the crash tests: SQUEEZEFLOW_FAULT_KILL=<task name> makes the process SIGKILL
    itself when that task has done its work (outputs written to the store, registry entry published) but
    before Prefect records it complete: the worst moment for a `kill -9`. Unset in normal runs."""
    if os.environ.get("SQUEEZEFLOW_FAULT_KILL") == task_name:
        os.kill(os.getpid(), signal.SIGKILL)


def stage_task(stage: str, **overrides):
    options = dict(
        name=stage,
        cache_policy=INPUTS + TASK_SOURCE + StageVersion(stage=stage),
        persist_result=True,
        result_serializer="json",
        retries=int(os.environ.get("SQUEEZEFLOW_TASK_RETRIES", "2")),
        retry_delay_seconds=[2, 10, 30],
        retry_condition_fn=is_transient,
    )
    options.update(overrides)

    def decorate(fn):
        @functools.wraps(fn)  # keeps the signature and the source Prefect hashes into the cache key
        def run(*args, **kwargs):
            out = fn(*args, **kwargs)
            fault_point(options["name"])
            return out

        return task(**options)(run)

    return decorate
