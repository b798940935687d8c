"""Test-only fault injection. Production code reads no fault settings: these patches are installed by the
tests that need them, in the process that runs the flow.

- `install_kill_after(task)`: the process SIGKILLs itself right after a stage of that task name has run
  and remembered its output, before Prefect records the task complete: the worst moment for a `kill -9`.
- Importing this module as a deployment entrypoint (`tests/integration/fault_flows.py:compress_flow`)
  slows every computed per-block compress stage by SQUEEZEFLOW_TEST_COMPRESS_DELAY_S seconds, which widens
  the window in which a test can kill a run between blocks.
"""
from __future__ import annotations

import os
import signal
import time

from squeezeflow import dag
from squeezeflow.flows.compress import compress_flow  # noqa: F401  (the deployment's entrypoint)
from squeezeflow.tasks.stages import TASK_NAMES

_execute = dag.execute


def install_kill_after(task: str) -> None:
    def execute(store, kind, inputs):
        out = _execute(store, kind, inputs)
        if TASK_NAMES[kind] == task:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    dag.execute = execute


def _slow_compress(store, kind, inputs):
    out = _execute(store, kind, inputs)
    if kind == "compress-block" and not out[1]:
        time.sleep(float(os.environ.get("SQUEEZEFLOW_TEST_COMPRESS_DELAY_S", "0")))
    return out


dag.execute = _slow_compress
