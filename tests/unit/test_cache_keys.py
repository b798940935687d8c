"""Stage cache keys (squeezeflow/memo.py) must be identical across processes (so a new run after a crash
finds every finished stage), change whenever an input or the stage version changes, and never depend on
where a file lies: a model is keyed by its fingerprint, not its path."""
import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json, sys
    from squeezeflow.dag import stage_key
    from squeezeflow.recipes import load_recipe
    from squeezeflow.pipeline import ModelInfo
    from squeezeflow.stats import StatsRef
    from squeezeflow.store import Ref

    block, path = int(sys.argv[1]), sys.argv[2]
    model = ModelInfo(ref="m", name="m", path=path, fingerprint="f" * 64, num_layers=4)
    stats = {"hdiag": StatsRef(collector="hdiag", key="stats-1",
                               blocks=[Ref(uri="sfs://" + "a" * 64, sha256="a" * 64, size=1, kind="stats/hdiag")])}
    inputs = {"model": model, "block": block, "recipe": load_recipe("rtn-w4g64"), "stats": stats}
    print(json.dumps(stage_key("compress-block", inputs)))
""")


def _key(block: int, path: str = "/models/m") -> str:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(block), path], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cache_key_is_stable_across_processes():
    k1, k2 = _key(0), _key(0)
    assert k1 and k1 == k2


def test_cache_key_changes_with_inputs_not_with_paths():
    assert _key(0) != _key(1)
    assert _key(0, "/elsewhere/copy-of-m") == _key(0)


def test_cache_key_includes_stage_version(monkeypatch):
    from squeezeflow import memo

    before = memo.stage_key("compress", {"x": 1})
    monkeypatch.setitem(memo.STAGE_VERSIONS, "compress", "999")
    assert memo.stage_key("compress", {"x": 1}) != before


def test_a_path_is_never_a_cache_key():
    from pathlib import Path

    import pytest

    from squeezeflow import memo

    with pytest.raises(TypeError, match="content"):
        memo.stage_key("compress", {"weights": Path("/models/m")})
