"""The per-block compress fan-out is bounded by the memory planner (squeezeflow/memory.py), through the
real Prefect caller inside a real flow run on a real Prefect server.

The flow runs in a child interpreter (as every flow test does) whose `dag.execute` records when each
compress-block stage starts and ends and holds each block for a moment, and whose planner sees as much
memory as the test says: room for one block -> no two block tasks overlap in time; room for every block
-> they do overlap (so the first check could have failed).
"""
from __future__ import annotations

import json
import textwrap
import uuid
from pathlib import Path

import pytest

from prefect_fixtures import TINY_LAYERS, prefect_server, run_flow_in_child, shared_inputs, tiny_llama  # noqa: F401

PROBE = textwrap.dedent('''
    """Test-only: time every compress-block stage; the planner sees SQUEEZEFLOW_TEST_AVAILABLE bytes."""
    import json, os, threading, time

    from squeezeflow import dag, memory
    from squeezeflow.flows.compress import compress_flow  # noqa: F401  (the flow the test runs)

    _execute, _lock = dag.execute, threading.Lock()

    def execute(store, kind, inputs):
        started = time.monotonic()
        out = _execute(store, kind, inputs)
        if kind == "compress-block":
            time.sleep(0.6)  # long enough that unbounded blocks are sure to overlap
            with _lock, open(os.environ["SQUEEZEFLOW_TEST_TIMES"], "a") as f:
                f.write(json.dumps([inputs["block"], started, time.monotonic()]) + "\\n")
        return out

    dag.execute = execute
    memory.available_bytes = lambda device="cpu": int(os.environ["SQUEEZEFLOW_TEST_AVAILABLE"])
''')


def _intervals(tmp_path: Path, tiny: Path, available: int, name: str, monkeypatch) -> list[tuple[int, float, float]]:
    work = tmp_path / name
    work.mkdir()
    (work / "fanout_probe.py").write_text(PROBE)
    times = work / "times.jsonl"
    monkeypatch.setenv("SQUEEZEFLOW_TEST_TIMES", str(times))
    monkeypatch.setenv("SQUEEZEFLOW_TEST_AVAILABLE", str(available))
    monkeypatch.delenv("SQUEEZEFLOW_MAX_BLOCKS", raising=False)
    params = {"model": {"ref": str(tiny)}, "recipe": "rtn-w4g32",
              "calibration": {"n_samples": 2, "seqlen": 32}, "evaluation": {"seqlen": 32, "max_windows": 1, "kl_windows": 0},
              "destinations": {"store": str(tmp_path / f"store-{uuid.uuid4().hex[:8]}"), "publish": False}}
    run_flow_in_child(params, work, timeout=600, flow="fanout_probe:compress_flow")
    rows = [tuple(json.loads(line)) for line in times.read_text().splitlines()]
    assert sorted(r[0] for r in rows) == list(range(TINY_LAYERS)), rows
    return rows


def _overlaps(rows) -> list:
    rows = sorted(rows, key=lambda r: r[1])
    return [(a[0], b[0]) for i, a in enumerate(rows) for b in rows[i + 1:] if b[1] < a[2]]


def test_planner_limit_of_one_runs_blocks_one_at_a_time(prefect_server, tiny_llama, tmp_path, monkeypatch):  # noqa: F811
    from squeezeflow import memory

    one_block = memory.block_peak_bytes(tiny_llama)
    # Room for one block (and not two): the planner says 1, and the caller keeps one block task in flight.
    rows = _intervals(tmp_path, tiny_llama, int(one_block * 1.5 / memory.HEADROOM), "one", monkeypatch)
    assert _overlaps(rows) == [], rows
    # Room for every block: they run together (the check above could have failed).
    rows = _intervals(tmp_path, tiny_llama, 1 << 40, "all", monkeypatch)
    assert _overlaps(rows), rows


def test_planner_counts_blocks_against_memory(tiny_llama, monkeypatch):  # noqa: F811
    from squeezeflow import memory
    from squeezeflow.job import ModelInfo
    from squeezeflow.recipes import load_recipe

    model = ModelInfo(ref="t", name="t", path=str(tiny_llama), fingerprint="f", num_layers=TINY_LAYERS)
    recipe = load_recipe("rtn-w4g32")
    peak = memory.block_peak_bytes(tiny_llama)
    counts = memory.block_parameter_counts(tiny_llama)
    assert len(counts) == TINY_LAYERS and peak == int(sum(counts[0].values()) * 4 * memory.DEFAULT_FACTOR)
    monkeypatch.delenv(memory.MAX_BLOCKS_ENV, raising=False)
    for avail, want in ((0, 1), (int(peak * 3.5 / memory.HEADROOM), 3), (1 << 40, None)):
        monkeypatch.setattr(memory, "available_bytes", lambda device="cpu", a=avail: a)
        got = memory.max_concurrent_blocks(model, recipe)
        assert got == want if want is not None else got > TINY_LAYERS
    monkeypatch.setenv(memory.MAX_BLOCKS_ENV, "2")
    assert memory.max_concurrent_blocks(model, recipe) == 2
    monkeypatch.setenv(memory.MAX_BLOCKS_ENV, "0")
    from squeezeflow.errors import BadInput

    with pytest.raises(BadInput, match="SQUEEZEFLOW_MAX_BLOCKS"):
        memory.max_concurrent_blocks(model, recipe)
    assert 0 < memory.host_available_bytes() < 1 << 50


def test_memory_limit_bounds_what_the_fan_out_counts(monkeypatch):
    """SQUEEZEFLOW_MEMORY_LIMIT stands for a pod's limit in the fan-out's count as in the preflight's plan:
    what is left under it beside this process, never more than the host has."""
    import psutil

    from squeezeflow import memory
    from squeezeflow.errors import BadInput

    monkeypatch.delenv(memory.LIMIT_ENV, raising=False)
    unbounded = memory.host_available_bytes()
    rss = psutil.Process().memory_info().rss
    monkeypatch.setenv(memory.LIMIT_ENV, str(rss + (256 << 20)))
    left = memory.host_available_bytes()
    assert left <= 256 << 20 and left > (128 << 20) and left < unbounded  # the process grows a little, not 128 MiB
    monkeypatch.setenv(memory.LIMIT_ENV, "2MiB")  # below any process: nothing left
    assert memory.host_available_bytes() == 0
    monkeypatch.setenv(memory.LIMIT_ENV, "lots")
    with pytest.raises(BadInput, match="SQUEEZEFLOW_MEMORY_LIMIT='lots' is not a size"):
        memory.host_available_bytes()
