"""How every stage task is configured: content-addressed caching, persisted JSON results, and retries
for transient failures only.

Cache key = the task's inputs (small pydantic refs and specs, hashed as JSON) + the task's source + the
stage version from squeezeflow.pipeline.STAGE_VERSIONS. The flow-run id is NOT part of it, so a new run
after a crash reuses every finished task. Results are serialized as JSON (never pickle).
"""
from __future__ import annotations

import os
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
    return task(**options)
