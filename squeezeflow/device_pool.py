"""Which device a per-block task computes on when a job spreads over several GPUs (`--device cuda` on a
machine with more than one): a per-run pool of device slots that block tasks lease at run time.

The device is a runtime choice, never an input: a block's cache key and its bytes are the same on cuda:1
as on cuda:0 (ComputeSpec.key_form names only the kind of device). So the lease is not in the stage's
inputs; the task leases a slot around its stage call (tasks/stages.py), and the stage reads the leased
device with `leased(default)` (stages/compress.py's `_stream`).

Each device gets as many slots as the memory planner allows on it (memory.max_concurrent_blocks for that
device); a lease takes a slot on the device with the most free slots (the lowest index on a tie), and
waits when every slot is taken. The pool works the same with a list of CPU "devices" (["cpu", "cpu"]),
which is how it is tested on machines without a GPU.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
from typing import Iterator

# The device leased by the current task (a contextvar: each Prefect worker thread runs its own task).
_LEASED: contextvars.ContextVar[str | None] = contextvars.ContextVar("squeezeflow_leased_device", default=None)
# A device list standing in for the one the job's compute setting gives (tests on CPU: ["cpu", "cpu"]).
_DEVICES: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("squeezeflow_devices", default=None)


class DevicePool:
    """Slots on each of `devices` (positions count, so ["cpu", "cpu"] is two devices)."""

    def __init__(self, devices: list[str], slots: list[int]):
        if not devices or len(devices) != len(slots) or min(slots) < 1:
            raise ValueError(f"a device pool needs ≥ 1 slot on each device: {devices} {slots}")
        self.devices, self.slots = list(devices), list(slots)
        self.busy = [0] * len(devices)
        self._cond = threading.Condition()

    @property
    def capacity(self) -> int:
        return sum(self.slots)

    def _pick(self) -> int | None:
        free = [s - b for s, b in zip(self.slots, self.busy)]
        best = max(range(len(free)), key=lambda i: (free[i], -i))
        return best if free[best] > 0 else None

    @contextlib.contextmanager
    def lease(self) -> Iterator[str]:
        """Hold one slot while the body runs; yields its device, which `leased()` returns meanwhile."""
        with self._cond:
            while (i := self._pick()) is None:
                self._cond.wait()
            self.busy[i] += 1
        token = _LEASED.set(self.devices[i])
        try:
            yield self.devices[i]
        finally:
            _LEASED.reset(token)
            with self._cond:
                self.busy[i] -= 1
                self._cond.notify()


def leased(default):
    """The device the current task leased, else `default` (no pool: the job's one device)."""
    device = _LEASED.get()
    return default if device is None else device


@contextlib.contextmanager
def using(device: str) -> Iterator[str]:
    """Compute on `device` in this context, as a lease would (a single-device caller, or a test)."""
    token = _LEASED.set(device)
    try:
        yield device
    finally:
        _LEASED.reset(token)


def devices_for(compute) -> list[str]:
    """The devices a job with resolved `compute` spreads over: the `spread_over` override, else compute.py's."""
    from .compute import devices_of

    override = _DEVICES.get()
    return list(override) if override is not None else devices_of(compute)


@contextlib.contextmanager
def spread_over(devices: list[str]) -> Iterator[list[str]]:
    """Spread work over `devices` in this context, whatever the job's compute setting says (the way the
    multi-device paths run on a CPU-only machine: ["cpu", "cpu"])."""
    token = _DEVICES.set(list(devices))
    try:
        yield list(devices)
    finally:
        _DEVICES.reset(token)


# Pools of the flow runs in this process, by the caller's key (flow run, model, recipe): a block task finds
# its run's pool by that key (a plain string, so a task's arguments stay picklable for Dask, where no pool
# is registered and the worker's own device is used).
_POOLS: dict[str, DevicePool] = {}
_POOLS_LOCK = threading.Lock()


def register(key: str, pool: DevicePool) -> None:
    with _POOLS_LOCK:
        _POOLS[key] = pool


def pool_for(key: str | None) -> DevicePool | None:
    with _POOLS_LOCK:
        return _POOLS.get(key) if key else None


@contextlib.contextmanager
def lease_from(key: str | None) -> Iterator[str | None]:
    """A lease from the pool registered under `key`; a no-op (yields None) when there is none."""
    pool = pool_for(key)
    if pool is None:
        yield None
        return
    with pool.lease() as device:
        yield device
