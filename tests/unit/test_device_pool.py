"""The per-run device pool block tasks lease a device from (squeezeflow/device_pool.py), the several-GPU
device list of a resolved compute setting (compute.py), and the lease reaching the compress stage."""
from __future__ import annotations

import contextlib
import threading

import pytest

from squeezeflow import device_pool
from squeezeflow.compute import device_of, devices_of, resolve_cuda
from squeezeflow.config import ComputeSpec
from squeezeflow.device_pool import DevicePool
from squeezeflow.errors import BadInput


def test_leases_fill_the_freest_device_and_wait_when_full():
    pool = DevicePool(["a", "b"], [1, 2])
    with contextlib.ExitStack() as held:
        got = [held.enter_context(pool.lease()) for _ in range(3)]
        assert got == ["b", "a", "b"]  # most free slots first, the lower index on a tie
        assert pool.busy == [1, 2]
        leased, waiting = [], threading.Event()

        def fourth():
            waiting.set()
            with pool.lease() as d:
                leased.append((d, device_pool.leased("none")))

        t = threading.Thread(target=fourth)
        t.start()
        waiting.wait(5)
        t.join(0.3)
        assert t.is_alive() and leased == []  # every slot taken: the fourth lease waits
    t.join(5)
    assert leased == [("b", "b")]  # a slot came free; inside the lease the stage sees its device
    assert pool.busy == [0, 0]


def test_a_failing_task_gives_its_slot_back():
    pool = DevicePool(["cuda:0"], [1])
    with pytest.raises(RuntimeError):
        with pool.lease():
            raise RuntimeError("block failed")
    assert pool.busy == [0]
    assert device_pool.leased("cpu") == "cpu"  # outside a lease: the job's own device


def test_pools_are_found_by_key_and_absent_ones_are_a_no_op():
    device_pool.register("run-1", DevicePool(["cpu", "cpu"], [1, 1]))
    with device_pool.lease_from("run-1") as d:
        assert d == "cpu" and device_pool.pool_for("run-1").busy == [1, 0]
    with device_pool.lease_from("no-such-run") as d, device_pool.lease_from(None) as e:
        assert d is None and e is None  # a Dask worker: no pool in its process, its own GPU is used


def test_a_pool_needs_a_slot_on_every_device():
    with pytest.raises(ValueError):
        DevicePool(["cuda:0", "cuda:1"], [1, 0])


def test_cuda_means_every_visible_gpu_and_cuda_n_one():
    assert resolve_cuda("cuda", 4) == "cuda" and resolve_cuda("cuda", 1) == "cuda:0"
    assert resolve_cuda("cuda:2", 4) == "cuda:2"
    with pytest.raises(BadInput, match="4 CUDA device"):
        resolve_cuda("cuda:4", 4)
    every = ComputeSpec(device="cuda")
    assert devices_of(every, 3) == ["cuda:0", "cuda:1", "cuda:2"]
    assert str(device_of(every)) == "cuda:0"  # the primary: calibration, statistics, evaluation run there
    assert devices_of(ComputeSpec(device="cuda:1"), 3) == ["cuda:1"] and devices_of(ComputeSpec(device="cpu")) == ["cpu"]
    # Which GPUs compute is not in any key: all of them and one of them key alike.
    assert every.key_form() == ComputeSpec(device="cuda:1").key_form()


def test_spread_over_stands_in_for_the_compute_setting():
    cpu = ComputeSpec(device="cpu")
    assert device_pool.devices_for(cpu) == ["cpu"]
    with device_pool.spread_over(["cpu", "cpu"]):
        assert device_pool.devices_for(cpu) == ["cpu", "cpu"]
    assert device_pool.devices_for(cpu) == ["cpu"]


def test_a_leased_device_is_where_the_block_stage_computes_and_not_in_its_key(tiny_model, tmp_path):
    """compress_block under a lease streams the block onto the leased device; its output is the same block."""
    from squeezeflow import dag
    from squeezeflow.config import CalibrationSpec, EvalSpec, ModelRef
    from squeezeflow.pipeline import preflight
    from squeezeflow.stages.compress import _stream
    from squeezeflow.store import LocalStore

    job = preflight(ModelRef(ref=str(tiny_model)), "rtn-w4g32", CalibrationSpec(n_samples=2, seqlen=32),
                    EvalSpec(seqlen=32, max_windows=1))
    with device_pool.using("meta"):
        assert _stream(job.model).device.type == "meta"  # the lease, not the job's setting, picks the device
    inputs = {"model": job.model, "block": 0, "recipe": job.weight_recipe, "stats": {}}
    plain, _ = dag.execute(LocalStore(tmp_path / "a"), "compress-block", inputs)
    pool = DevicePool(["cpu", "cpu"], [1, 1])
    with pool.lease(), pool.lease() as second:
        assert second == "cpu" and pool.busy == [1, 1]
        leased, _ = dag.execute(LocalStore(tmp_path / "b"), "compress-block", inputs)
    assert leased.sha256 == plain.sha256
