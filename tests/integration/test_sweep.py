"""A sweep of three recipes shares calibration, the statistics pass and the baseline; a repeated sweep
recomputes nothing; the comparison table lists every recipe."""
import time

import pytest

from prefect_fixtures import (  # noqa: F401  (fixtures are used by name)
    prefect_server,
    read_task_runs,
    run_flow_in_child,
    shared_inputs,
    states_by_task,
    task_name,
    tiny_llama,
)

pytestmark = pytest.mark.integration

RECIPES = ["rtn-w4g32", "rtn-w3g32", "gptq-w3g32"]


def settled(flow_run_id, expected: int, timeout: float = 30.0) -> list:
    """Task runs reach the API through events and may trail the flow's final state by a moment."""
    deadline = time.monotonic() + timeout
    while True:
        runs = read_task_runs(flow_run_id)
        if (len(runs) >= expected and all(tr.state and tr.state.is_final() for tr in runs)) or time.monotonic() > deadline:
            return runs
        time.sleep(0.5)


def test_sweep_shares_stages_and_repeats_from_cache(prefect_server, s3_server, tiny_llama, tmp_path):
    params = {"model": {"ref": str(tiny_llama)}, "recipes": RECIPES,
              "calibration": {"n_samples": 4, "seqlen": 64}, "evaluation": {"seqlen": 64, "max_windows": 2},
              "destinations": {"store": str(tmp_path / "store")}}
    first = run_flow_in_child(params, tmp_path / "run1", flow="squeezeflow.flows.sweep:sweep_flow")
    # 4 blocks x 2 RTN recipes fan out; GPTQ is one sequential task; per recipe pack, evaluate, assemble, publish.
    expected = 1 + 1 + 1 + 2 * 4 + 1 + 3 * 4
    runs = settled(first["flow_run_id"], expected)
    counts = {}
    for tr in runs:
        counts[task_name(tr)] = counts.get(task_name(tr), 0) + 1
    assert counts["calibrate"] == 1 and counts["statistics"] == 1, states_by_task(runs)
    assert counts["evaluate"] == 1 + len(RECIPES)  # the fp32 baseline once, each packed model once
    assert [m["recipe"] for m in first["result"]["results"]] == ["fp32", *RECIPES]
    assert all(m["uri"] for m in first["result"]["results"][1:])
    from squeezeflow.store import Ref, open_store

    report = open_store(str(tmp_path / "store")).get_tree(Ref(**first["result"]["report"]))
    assert {"comparison.md", "comparison.csv", "comparison.json", "plots/perplexity_vs_bits.png",
            "plots/layer_errors.png"} <= set(report)

    second = run_flow_in_child(params, tmp_path / "run2", flow="squeezeflow.flows.sweep:sweep_flow")
    runs2 = settled(second["flow_run_id"], expected)
    recomputed = [tr.name for tr in runs2 if task_name(tr) != "publish" and tr.state.name != "Cached"]
    assert recomputed == [], states_by_task(runs2)
    def without_timing(results):
        return [{k: v for k, v in m.items() if k != "speed"} for m in results]

    assert without_timing(second["result"]["results"]) == without_timing(first["result"]["results"])
