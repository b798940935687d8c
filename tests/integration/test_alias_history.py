"""Alias history against a real SeaweedFS: every move is logged once, in order, and the CLI shows it (and
what a promotion replaced). Concurrent promotions: test_registry.py::test_concurrent_promotes_all_land."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from squeezeflow.cli import main
from squeezeflow.registry import Registry
from test_registry import MODEL, RECIPE, all_objects, make_artifact

pytestmark = pytest.mark.integration


def _publish(reg: Registry, tmp_path: Path, n: int) -> list:
    return [reg.publish(make_artifact(tmp_path / f"e{i}", seed=i), MODEL, RECIPE, f"e{i}", alias=None)
            for i in range(n)]


def test_every_move_is_logged_in_order_and_no_op_moves_are_not(registry: Registry, tmp_path: Path):
    e0, e1 = _publish(registry, tmp_path, 2)
    assert registry.history(MODEL, RECIPE, "production") == []
    assert registry.list()[0]["aliases"] == []  # publish(alias=None) moved nothing, not even latest
    for entry in (e0, e1, e1, e0):  # the second e1 is a no-op
        registry.promote(entry.uri, "production")
    history = registry.history(MODEL, RECIPE, "production")
    assert [(h["seq"], h["artifact_id"]) for h in history] == [(1, "e0"), (2, "e1"), (3, "e0")]
    assert [(h["previous"] or {}).get("artifact_id") for h in history] == [None, "e0", "e1"]
    # Records are create-only objects; the current position is logged by the move that leaves it.
    logged = sorted(k.rsplit("/", 1)[1] for k in all_objects(registry) if "/alias-history/" in k)
    assert logged == ["0000000001.json", "0000000002.json"]
    registry.promote(e1.uri, "production")
    assert len([k for k in all_objects(registry) if "/alias-history/" in k]) == 3
    assert [h["artifact_id"] for h in registry.history(MODEL, RECIPE, "production")] == ["e0", "e1", "e0", "e1"]
    # Another alias has its own history.
    assert [h["artifact_id"] for h in registry.history(MODEL, RECIPE, "candidate")] == []


def test_cli_promote_and_history(registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture):
    e0, e1 = _publish(registry, tmp_path, 2)
    assert main(["registry", "promote", e0.uri, "--alias", "production", "--registry", registry.uri]) == 0
    out = capsys.readouterr().out
    assert f"{MODEL}/{RECIPE}@production -> e0 ({e0.uri})" in out and "was: (new alias)" in out
    assert main(["--json", "registry", "promote", f"{MODEL}/{RECIPE}/e1", "--alias", "production",
                 "--registry", registry.uri]) == 0
    promoted = json.loads(capsys.readouterr().out)
    assert (promoted["uri"], promoted["previous"], promoted["alias"]) == (e1.uri, e0.uri, "production")

    assert main(["registry", "history", f"{MODEL}/{RECIPE}", "--registry", registry.uri]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and " e0 " in lines[0] and "(was e0)" in lines[1] and lines[1].endswith(e1.uri)
    assert main(["--json", "registry", "history", f"{MODEL}/{RECIPE}@production", "--registry", registry.uri]) == 0
    assert [h["artifact_id"] for h in json.loads(capsys.readouterr().out)["history"]] == ["e0", "e1"]
    # An entry URI names its model/recipe too; an alias that never moved says so.
    assert main(["registry", "history", e0.uri, "--alias", "candidate", "--registry", registry.uri]) == 0
    assert "never set" in capsys.readouterr().out
    assert main(["registry", "history", f"{MODEL}/{RECIPE}@latest", "--alias", "production",
                 "--registry", registry.uri]) == 2
    assert "--alias" in capsys.readouterr().err
    assert main(["registry", "history", "--registry", registry.uri]) == 2
    assert "needs a REF" in capsys.readouterr().err
