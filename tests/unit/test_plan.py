"""The stage plan: one list of typed stages per job, run by one loop, inspectable with `squeezeflow plan`."""
import json
import os
import subprocess
import sys


from squeezeflow import dag, pipeline
from squeezeflow.config import CalibrationSpec, EvalSpec, ModelRef
from squeezeflow.store import LocalStore

CALIB = CalibrationSpec(n_samples=4, seqlen=32, seed=0)
EVAL = EvalSpec(seqlen=32, max_windows=2)


def kinds(job):
    return [s.kind for s in dag.plan(job)]


def test_plan_has_the_stages_the_recipe_needs(tiny_model):
    m = ModelRef(ref=str(tiny_model))
    rtn = pipeline.preflight(m, "rtn-w4g32", CALIB, EVAL)
    assert kinds(rtn) == ["calibrate", "statistics", "evaluate", *["compress-block"] * 2, "pack", "evaluate", "assemble"]
    assert [s for s in dag.plan(rtn) if s.fan_out] == [s for s in dag.plan(rtn) if s.kind == "compress-block"]
    gptq = pipeline.preflight(m, "gptq-w4g32", CALIB, EVAL)
    assert "compress-sequential" in kinds(gptq) and "compress-block" not in kinds(gptq)
    quad = pipeline.preflight(m, "quad-w4a4a8-peft4", CALIB, EVAL)
    assert kinds(quad).index("transform") < kinds(quad).index("compress-sequential") < kinds(quad).index("tune")
    chain = pipeline.preflight(m, "trsp-50+rtn-w4g32", CALIB, EVAL)
    k = kinds(chain)
    assert k.index("restructure") < k.index("statistics", 3) < k.index("compress-block")
    assert k.count("compress-block") == 1  # one of two blocks left after removal
    assert dag.plan(rtn, "s3://bucket/registry")[-1].kind == "publish"


def test_sweep_plan_shares_calibration_statistics_and_baseline(tiny_model):
    m = ModelRef(ref=str(tiny_model))
    jobs = [pipeline.preflight(m, r, CALIB, EVAL) for r in ("rtn-w4g32", "wanda-p50", "gptq-w4g32")]
    stages = dag.plan(jobs)
    assert [s.kind for s in stages].count("calibrate") == 1 and [s.kind for s in stages].count("statistics") == 1
    assert set(stages[1].inputs["statistics"]) == {s for j in jobs for s in j.statistics}


def test_plain_loop_remembers_every_stage_and_plan_says_so(tiny_model, tmp_path):
    store = LocalStore(tmp_path / "store")
    job = pipeline.preflight(ModelRef(ref=str(tiny_model)), "rtn-w4g32", CALIB, EVAL)
    before = dag.probe(dag.plan(job), store)
    assert [r["cached"] for r in before] == [False] * len(before)
    assert before[0]["key"] and all(r["key"] is None for r in before if r["after"])  # inputs not computed yet
    first = pipeline.run_job(job, store)
    after = dag.probe(dag.plan(job), store)
    assert all(r["cached"] for r in after), after
    calls = []

    def counting(store_, stage, inputs):
        out, hit = dag.execute(store_, stage.kind, inputs)
        calls.append(hit)
        return out

    again = pipeline.by_role(job, dag.run(dag.plan(job), store, counting))
    assert calls and all(calls) and again["artifact"] == first["artifact"]


def test_plan_cli_lists_stages_keys_and_cache_state(tiny_model, tmp_path):
    env = dict(os.environ, SQUEEZEFLOW_STORE=str(tmp_path / "store"))
    args = [sys.executable, "-m", "squeezeflow.cli", "plan", str(tiny_model), "--recipe", "rtn-w4g32", "--no-publish",
            "--calib-samples", "4", "--seqlen", "32", "--eval-windows", "2"]
    out = subprocess.run([*args, "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert [s["id"] for s in plan["stages"]][:3] == ["calibrate", "statistics", "evaluate-fp32"]
    assert plan["stages"][0]["key"].startswith("calibrate-") and not plan["stages"][0]["cached"]
    text = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert text.returncode == 0 and "rtn-w4g32/compress[1]" in text.stdout and "pending" in text.stdout
    bad = subprocess.run([*args[:5], "--recipe", "awq-w4g32"], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "unknown recipe" in bad.stderr
