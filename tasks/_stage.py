"""How every stage task is configured: retries for transient failures only, and no Prefect-persisted
results at all.

Caching is not Prefect's here: each stage's output is remembered in our artifact store under its inputs'
key (squeezeflow/memo.py), as JSON, so a rerun after a crash, SIGKILL or SIGTERM finds every finished stage
whatever Prefect recorded, and no stored record is ever unpickled (a Prefect result record names its own
serializer, pickle included, and Prefect would honour it on a cache hit). A stage whose output was
remembered finishes in a Completed state named "Cached", so the UI still shows what was reused.
"""
from __future__ import annotations

import errno
import os

from prefect import task
from prefect.cache_policies import NO_CACHE

from squeezeflow.errors import BadInput, IntegrityError


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
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
        return False  # a full or read-only store does not fix itself in seconds: fail now, resume later
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


def stage_task(name: str, **overrides):
    """`@task` with the stage options: never cached or persisted by Prefect, retried when transient."""
    options = dict(
        name=name,
        cache_policy=NO_CACHE,
        persist_result=False,
        retries=int(os.environ.get("SQUEEZEFLOW_TASK_RETRIES", "2")),
        retry_delay_seconds=[2, 10, 30],
        retry_condition_fn=is_transient,
    )
    options.update(overrides)
    return task(**options)
