"""Task cache keys must be identical across processes (so a new run after a crash hits the cache) and
change whenever an input, the task source or the stage version changes."""
import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json, sys
    from types import SimpleNamespace
    from squeezeflow.config import load_recipe
    from squeezeflow.pipeline import ModelInfo
    from squeezeflow.stats import StatsRef
    from squeezeflow.store import Ref
    from squeezeflow.tasks.compress import compress_block

    block = int(sys.argv[1])
    model = ModelInfo(ref="m", name="m", path="/models/m", fingerprint="f" * 64, num_layers=4)
    stats = {"hdiag": StatsRef(collector="hdiag", key="stats-1",
                               blocks=[Ref(uri="sfs://" + "a" * 64, sha256="a" * 64, size=1, kind="stats/hdiag")])}
    inputs = {"store_uri": "/store", "model": model, "block": block, "recipe": load_recipe("rtn-w4g64"), "stats": stats}
    ctx = SimpleNamespace(task=compress_block)
    print(json.dumps(compress_block.cache_policy.compute_key(task_ctx=ctx, inputs=inputs, flow_parameters={})))
""")


def _key(block: int) -> str:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(block)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cache_key_is_stable_across_processes():
    k1, k2 = _key(0), _key(0)
    assert k1 and k1 == k2


def test_cache_key_changes_with_inputs():
    assert _key(0) != _key(1)


def test_cache_key_includes_stage_version(monkeypatch):
    from squeezeflow import pipeline
    from squeezeflow.tasks._stage import StageVersion

    before = StageVersion(stage="compress").compute_key(None, {}, {})
    monkeypatch.setitem(pipeline.STAGE_VERSIONS, "compress", "999")
    assert StageVersion(stage="compress").compute_key(None, {}, {}) != before
