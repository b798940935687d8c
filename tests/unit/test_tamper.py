"""Tampering: a packed artifact that was changed after the pipeline wrote it never loads.

One flipped byte in any file, a manifest edited to list other files or to pass for another model,
recipe or result, and a planted pickle are each refused by `squeezeflow.load` with an IntegrityError
naming the problem. Nothing in the library ever unpickles, and remote code stays off by default.
"""
from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest

import squeezeflow
from squeezeflow import pipeline
from squeezeflow.config import CalibrationSpec, EvalSpec, ModelRef
from squeezeflow.errors import IntegrityError
from squeezeflow.registry import content_id, verify_dir
from squeezeflow.store import LocalStore, canonical_json, sha256_file
from sf_testing import run_stages, tally

REPO = Path(__file__).resolve().parents[2]
CALIB = CalibrationSpec(n_samples=4, seqlen=32, seed=0)
EVAL = EvalSpec(seqlen=32, max_windows=2, kl_windows=0)


def _artifact(tiny_model: Path, store: LocalStore, recipe: str) -> Path:
    plan = pipeline.preflight(ModelRef(ref=str(tiny_model)), recipe, CALIB, EVAL)
    return store.materialize(run_stages(store, plan, base=False)["artifact"])


@pytest.fixture(scope="module")
def artifacts(tiny_model, tmp_path_factory) -> tuple[Path, Path]:
    store = LocalStore(tmp_path_factory.mktemp("tamper-store"))
    return _artifact(tiny_model, store, "rtn-w4g32"), _artifact(tiny_model, store, "rtn-w3g32")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".squeezeflow-complete"), copy_function=shutil.copyfile)
    return dst


def _rewrite_manifest(root: Path, edit, reid: bool = True) -> None:
    """Apply `edit` to the manifest and, like a careful forger, make it self-consistent again: every
    file's hash and size re-listed and the content id recomputed."""
    manifest = json.loads((root / "manifest.json").read_text())
    edit(manifest)
    manifest["files"] = {p.relative_to(root).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
                         for p in sorted(root.rglob("*")) if p.is_file() and p.name != "manifest.json"}
    if reid:
        manifest["artifact_id"] = content_id(manifest["files"], manifest["lineage"])
    (root / "manifest.json").write_bytes(canonical_json(manifest))


def test_the_untouched_artifact_loads(artifacts, tmp_path):
    art = _copy(artifacts[0], tmp_path / "a")
    assert verify_dir(art)["artifact_id"] == json.loads((art / "manifest.json").read_text())["artifact_id"]
    assert squeezeflow.load(str(art)) is not None


def test_one_flipped_byte_in_any_file_is_refused(artifacts, tmp_path):
    src = artifacts[0]
    files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*")
                   if p.is_file() and p.name != ".squeezeflow-complete")
    assert {"manifest.json", "model.safetensors", "config.json", "report/metrics.json"} <= set(files)
    refused = []
    for i, rel in enumerate(files):
        art = _copy(src, tmp_path / f"flip{i}")
        data = bytearray((art / rel).read_bytes())
        data[len(data) // 2] ^= 0x01  # same size, one bit different
        (art / rel).write_bytes(bytes(data))
        with pytest.raises(IntegrityError) as e:
            squeezeflow.load(str(art))
        # the message names the file, or for the manifest itself says it is broken or modified
        named = rel in str(e.value) or (rel == "manifest.json" and re.search("manifest", str(e.value)))
        tally("tampered files refused", bool(named))
        assert named, str(e.value)
        refused.append(rel)
    assert refused == files


@pytest.mark.parametrize("case", ["weights from another artifact", "model renamed", "recipe renamed",
                                  "metrics improved", "artifact id of another entry"])
def test_a_manifest_edited_to_point_elsewhere_is_refused(case, artifacts, tmp_path):
    art = _copy(artifacts[0], tmp_path / "a")
    other = json.loads((artifacts[1] / "manifest.json").read_text())
    if case == "weights from another artifact":
        # the other run's weights, re-listed with their true hash; the id is left alone
        shutil.copy(artifacts[1] / "model.safetensors", art / "model.safetensors")
        _rewrite_manifest(art, lambda m: None, reid=False)
        expected = "content id"
    elif case == "model renamed":
        _rewrite_manifest(art, lambda m: m.update(model="llama-70b"))
        expected = "model 'llama-70b'"
    elif case == "recipe renamed":
        _rewrite_manifest(art, lambda m: m.update(recipe=other["recipe"]))
        expected = f"recipe {other['recipe']!r}"
    elif case == "metrics improved":
        _rewrite_manifest(art, lambda m: m["metrics"]["perplexity"].update({k: 1.0 for k in m["metrics"]["perplexity"]}))
        expected = "metrics differ"
    else:
        _rewrite_manifest(art, lambda m: m.update(artifact_id=other["artifact_id"]), reid=False)
        expected = "content id"
    with pytest.raises(IntegrityError, match="manifest was modified") as e:
        squeezeflow.load(str(art))
    assert expected in str(e.value)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "extra.dat", "weights.pt"])
def test_a_planted_pickle_is_refused_even_in_a_self_consistent_manifest(name, artifacts, tmp_path):
    art = _copy(artifacts[0], tmp_path / "a")
    (art / name).write_bytes(pickle.dumps({"model.layers.0.weight": [0.0] * 8}, protocol=4))  # never loaded
    _rewrite_manifest(art, lambda m: None)   # listed with its true hash, content id recomputed
    with pytest.raises(IntegrityError, match=f"{re.escape(name)}: a pickle"):
        squeezeflow.load(str(art))


def test_a_manifest_without_content_id_does_not_load(artifacts, tmp_path):
    art = _copy(artifacts[0], tmp_path / "a")
    _rewrite_manifest(art, lambda m: m.pop("artifact_id"), reid=False)
    with pytest.raises(IntegrityError, match="cannot be authenticated"):
        squeezeflow.load(str(art))


UNPICKLING = re.compile(r"\b(pickle\.loads?|cloudpickle|dill\.loads?|joblib\.load|torch\.load|"
                        r"allow_pickle\s*=\s*True|weights_only\s*=\s*False|trust_remote_code\s*=\s*True)")


def test_no_library_code_unpickles_or_trusts_remote_code():
    """Grep-level: the library, tasks, flows and kernels never call an unpickler and never hard-wire
    trust_remote_code on (it is a user option, False by default)."""
    hits = []
    for pkg in ("squeezeflow", "kernels", "tasks", "flows"):
        for path in sorted((REPO / pkg).rglob("*.py")):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if UNPICKLING.search(line.split("#")[0]):
                    hits.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert hits == []
    assert ModelRef(ref="x").trust_remote_code is False
