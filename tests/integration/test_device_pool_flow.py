"""Through the real Prefect caller in a real flow run: with several devices, every per-block compress task runs
under a lease from the run's device pool (tasks/stages.py, squeezeflow/device_pool.py). On CPU the devices are
["cpu", "cpu"] (device_pool.spread_over, around the compress flow called as a subflow)."""
from __future__ import annotations

import json
import textwrap
import uuid

from prefect_fixtures import TINY_LAYERS, prefect_server, run_flow_in_child, shared_inputs, tiny_llama  # noqa: F401

PROBE = textwrap.dedent('''
    """Test-only: record the device each compress-block stage leased, and the run's pool."""
    import json, os, threading

    from prefect import flow

    from squeezeflow import dag, device_pool
    from squeezeflow.flows.compress import compress_flow

    _execute, _lock = dag.execute, threading.Lock()

    def execute(store, kind, inputs):
        if kind == "compress-block":
            pools = [(p.devices, p.slots, list(p.busy)) for p in device_pool._POOLS.values()]
            with _lock, open(os.environ["SQUEEZEFLOW_TEST_LEASES"], "a") as f:
                f.write(json.dumps([inputs["block"], device_pool.leased(None), pools]) + "\\n")
        return _execute(store, kind, inputs)

    dag.execute = execute

    @flow
    def spread(model: dict, recipe: str, calibration: dict, evaluation: dict, destinations: dict):
        with device_pool.spread_over(["cpu", "cpu"]):
            return compress_flow(model=model, recipe=recipe, calibration=calibration, evaluation=evaluation,
                                 destinations=destinations)
''')


def test_block_tasks_lease_devices_from_the_runs_pool(prefect_server, tiny_llama, tmp_path, monkeypatch):  # noqa: F811
    (tmp_path / "pool_probe.py").write_text(PROBE)
    leases = tmp_path / "leases.jsonl"
    monkeypatch.setenv("SQUEEZEFLOW_TEST_LEASES", str(leases))
    monkeypatch.setenv("SQUEEZEFLOW_MAX_BLOCKS", "1")  # one slot per device: two blocks at most, one on each
    params = {"model": {"ref": str(tiny_llama)}, "recipe": "rtn-w4g32",
              "calibration": {"n_samples": 2, "seqlen": 32},
              "evaluation": {"seqlen": 32, "max_windows": 1, "kl_windows": 0},
              "destinations": {"store": str(tmp_path / f"store-{uuid.uuid4().hex[:8]}"), "publish": False}}
    run_flow_in_child(params, tmp_path, timeout=600, flow="pool_probe:spread")
    rows = [json.loads(line) for line in leases.read_text().splitlines()]
    assert sorted(r[0] for r in rows) == list(range(TINY_LAYERS)), rows
    assert all(r[1] == "cpu" for r in rows), rows  # each block ran under a lease (None: no pool was used)
    for _, _, pools in rows:
        assert len(pools) == 1 and pools[0][:2] == [["cpu", "cpu"], [1, 1]], pools
        assert 1 <= sum(pools[0][2]) <= 2 and max(pools[0][2]) <= 1  # a slot held by this block, ≤ 1 per device
