"""The model fingerprint covers weights, config and tokenizer by content and notices every change: a
fingerprint record is never trusted beyond what the files' stats prove, and a damaged one is rebuilt."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from squeezeflow import fingerprint as fp_mod
from squeezeflow.errors import BadInput
from squeezeflow.fingerprint import FINGERPRINT_FILE, fingerprint_files
from squeezeflow.models import prepare_model, resolve_model
from sf_testing import tally


@pytest.fixture()
def model_dir(tiny_model, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_model, tmp_path / "tiny"))


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _scale_weights_in_place(path: Path, factor: float, keep_mtime: bool = True) -> None:
    """Multiply every weight, same file size, same inode; the mtime put back as a careful editor would."""
    st = os.stat(path)
    tensors = {k: v * factor for k, v in load_file(path).items()}
    tmp = path.with_name("scaled.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    with open(path, "r+b") as f:   # in place: keeps the inode
        f.write(tmp.read_bytes())
    tmp.unlink()
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_ino == st.st_ino
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


CHANGES = {
    "config rms_norm_eps": lambda d: _edit_json(d / "config.json", rms_norm_eps=1e-3),
    "config rope_theta": lambda d: _edit_json(d / "config.json", rope_theta=500000.0),
    "tokenizer.json": lambda d: (d / "tokenizer.json").write_text((d / "tokenizer.json").read_text()
                                                                   .replace('"<|endoftext|>"', '"<|end|>"', 1)),
    "tokenizer_config.json": lambda d: _edit_json(d / "tokenizer_config.json", model_max_length=7),
    "weights x50, file and its mtime left in place": lambda d: _scale_weights_in_place(d / "model.safetensors", 50.0),
    "generation_config.json": lambda d: _edit_json(d / "generation_config.json", temperature=0.1),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_every_covered_file_changes_the_fingerprint(change, model_dir):
    if not (model_dir / "generation_config.json").exists():
        (model_dir / "generation_config.json").write_text("{}")
    before = resolve_model(str(model_dir)).fingerprint
    assert resolve_model(str(model_dir)).fingerprint == before   # stable while nothing changes
    CHANGES[change](model_dir)
    after = resolve_model(str(model_dir)).fingerprint
    tally("tampering refused", after != before)
    assert after != before, change


def test_a_record_inside_the_model_directory_is_not_trusted(model_dir):
    """The reported case: a prepared-style directory with its fingerprint file left in place."""
    fingerprint, _, _ = fingerprint_files(model_dir, model_dir / FINGERPRINT_FILE)
    assert resolve_model(str(model_dir)).fingerprint == fingerprint
    _scale_weights_in_place(model_dir / "model.safetensors", 50.0)
    scaled = resolve_model(str(model_dir)).fingerprint
    tally("tampering refused", scaled != fingerprint)
    assert scaled != fingerprint
    # A record rewritten to claim the old fingerprint, with the files' current stats, still cannot
    # make the fingerprint lie: it is recomputed from per-file hashes, never read.
    record = json.loads((model_dir / FINGERPRINT_FILE).read_text())
    record["fingerprint"] = fingerprint
    (model_dir / FINGERPRINT_FILE).write_text(json.dumps(record))
    assert resolve_model(str(model_dir)).fingerprint == scaled


def test_same_content_gives_the_same_fingerprint_anywhere(model_dir, tiny_model, tmp_path):
    other = Path(shutil.copytree(tiny_model, tmp_path / "elsewhere"))
    assert resolve_model(str(model_dir)).fingerprint == resolve_model(str(other)).fingerprint
    CHANGES["config rms_norm_eps"](other)
    shutil.copyfile(model_dir / "config.json", other / "config.json")   # back to the same bytes
    assert resolve_model(str(model_dir)).fingerprint == resolve_model(str(other)).fingerprint


def test_unchanged_files_are_not_hashed_again(model_dir, monkeypatch):
    resolve_model(str(model_dir))
    hashed = []
    real = fp_mod.sha256_file
    monkeypatch.setattr(fp_mod, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    resolve_model(str(model_dir))
    assert hashed == []
    os.utime(model_dir / "config.json")   # touched, same bytes: hashed once more, fingerprint unchanged
    resolve_model(str(model_dir))
    assert hashed == ["config.json"]


@pytest.mark.parametrize("content", [b"", b"\x00\xff garbage", b"[1, 2]", b'{"format": 2, "files": []}',
                                     b'{"format": 2, "files": {"model.safetensors": {"sha256": "zz", "stats": "x"}}}',
                                     b'{"format": 2, "fingerprint": "' + b"0" * 64 + b'", "files": {}}',
                                     b'{"fingerprint": 5, "files": {"model.safetensors": 7}}', b'{"files": {'])
def test_a_damaged_fingerprint_file_is_recomputed(content, model_dir, tiny_model):
    truth = resolve_model(str(tiny_model)).fingerprint
    (model_dir / FINGERPRINT_FILE).write_bytes(content)
    got = resolve_model(str(model_dir)).fingerprint
    tally("tampering refused", got == truth)
    assert got == truth
    assert json.loads((model_dir / FINGERPRINT_FILE).read_text())["fingerprint"] == truth   # rewritten


def test_a_dangling_fingerprint_link_is_replaced(model_dir, tiny_model):
    (model_dir / FINGERPRINT_FILE).symlink_to(model_dir / "nowhere")
    assert resolve_model(str(model_dir)).fingerprint == resolve_model(str(tiny_model)).fingerprint
    assert not (model_dir / FINGERPRINT_FILE).is_symlink() and not (model_dir / "nowhere").exists()


@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
def test_an_unreadable_fingerprint_file_is_one_line(kind, model_dir):
    path = model_dir / FINGERPRINT_FILE
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero")
    with pytest.raises(BadInput, match=FINGERPRINT_FILE) as e:
        resolve_model(str(model_dir))
    tally("bad inputs rejected cleanly", "\n" not in str(e.value))


def _prepared_copy(src: Path, models: Path) -> Path:
    """The prepared SmolLM2 in another models directory: weights hard-linked (no 540 MB copy; edits
    below replace files, so the shared original is never written), small files copied."""
    dest = models / "smollm2-135m"
    dest.mkdir(parents=True)
    for f in src.iterdir():
        try:
            os.link(f, dest / f.name) if f.name.endswith(".safetensors") else shutil.copy2(f, dest / f.name)
        except OSError:
            shutil.copy2(f, dest / f.name)
    return dest


def test_a_prepared_model_with_an_old_record_is_upgraded_without_rebuilding(tmp_path, monkeypatch):
    truth = prepare_model("smollm2-135m")
    monkeypatch.setenv("SQUEEZEFLOW_MODELS", str(tmp_path / "models"))
    dest = _prepared_copy(truth.path, tmp_path / "models")
    weights = dest / "model.safetensors"
    record = json.loads((dest / FINGERPRINT_FILE).read_text())
    # the format-1 record: the weights' hashes only
    (dest / FINGERPRINT_FILE).write_text(json.dumps({"fingerprint": "f" * 64, "source": record.get("source"),
                                                     "files": {"model.safetensors": record["prepared"]["model.safetensors"]}}))
    ino = os.stat(weights).st_ino
    again = prepare_model("smollm2-135m")
    assert again.fingerprint == truth.fingerprint and os.stat(weights).st_ino == ino   # not rebuilt
    assert set(json.loads((dest / FINGERPRINT_FILE).read_text())["prepared"]) >= {"model.safetensors", "config.json"}


def test_a_changed_prepared_model_is_prepared_again(tmp_path, monkeypatch):
    """The prepared model is our cache of the pinned GGUF: changed, it no longer is that model; it is
    rebuilt, not used under a name that promises other weights."""
    truth = prepare_model("smollm2-135m")
    true_config = (truth.path / "config.json").read_bytes()
    monkeypatch.setenv("SQUEEZEFLOW_MODELS", str(tmp_path / "models"))
    dest = _prepared_copy(truth.path, tmp_path / "models")
    _edit_json(dest / "config.json", rms_norm_eps=1e-3)   # a copy, not a link: the original stays
    again = prepare_model("smollm2-135m")
    tally("tampering refused", again.fingerprint == truth.fingerprint)
    assert again.path == dest and again.fingerprint == truth.fingerprint
    assert (dest / "config.json").read_bytes() == true_config
    assert torch.equal(load_file(dest / "model.safetensors")["model.norm.weight"],
                       load_file(truth.path / "model.safetensors")["model.norm.weight"])
