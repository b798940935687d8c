"""Text sources, tokenization and window sampling, with a tiny byte-level BPE built in the test."""
from __future__ import annotations

import json

import pytest
import torch

from squeezeflow import calibration as cal
from squeezeflow.errors import BadInput

SENTENCES = [
    "We the people of the United States, in order to form a more perfect union.",
    "The quick brown fox jumps over the lazy dog.",
    "Call me Ishmael. Some years ago, never mind how long precisely.",
    "The state of the union is strong, and the Congress shall assemble.",
]


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Same pre-tokenization family as SmolLM2 (GPT-2 style byte-level BPE), small vocabulary.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def long_text(words: int = 6000) -> str:
    # One very long line (like the SOTU files) plus a few paragraphs.
    body = " ".join(SENTENCES[i % len(SENTENCES)] for i in range(words // 12))
    return body + "\n\n" + "\n\n".join(SENTENCES) + "\n"


# --- text sources ---------------------------------------------------------------------------------
def test_txt_file(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("  Hello there.\n\nSecond paragraph.\n")
    src = cal.load_text(str(p))
    assert src.text == "Hello there.\n\nSecond paragraph.\n"
    assert src.sha256 == cal.sha256_bytes(src.text.encode())
    assert src.n_docs == 1
    assert src.origin == str(p.resolve())


def test_directory_sorted_by_relative_path(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "sub" / "c.txt").write_text("third")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "jsonl doc"}) + "\n")
    (tmp_path / "notes.md").write_text("ignored")
    src = cal.load_text(str(tmp_path))
    assert src.text == "first\n\nsecond\n\njsonl doc\n\nthird\n"
    assert src.n_docs == 4


def test_jsonl(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"text": "one", "id": 1}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    src = cal.load_text(str(p))
    assert src.text == "one\n\ntwo\n"
    assert src.n_docs == 2


@pytest.mark.parametrize("bad_line, message", [
    (json.dumps({"body": "no text field"}), "line 2 has no string field"),
    ("{not json", "line 2 is not valid JSON"),
    (json.dumps(["text"]), "line 2 has no string field"),
])
def test_jsonl_bad_line_names_line_number(tmp_path, bad_line, message):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"text": "ok"}) + "\n" + bad_line + "\n")
    with pytest.raises(BadInput, match=message):
        cal.load_text(str(p))


@pytest.mark.parametrize("name, content", [
    ("empty.txt", ""),
    ("blank.txt", " \n\n\t\n"),
    ("empty.jsonl", json.dumps({"text": "  "}) + "\n"),
])
def test_empty_corpus(tmp_path, name, content):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(BadInput, match="is empty"):
        cal.load_text(str(p))


def test_empty_directory(tmp_path):
    with pytest.raises(BadInput, match="is empty"):
        cal.load_text(str(tmp_path))


def test_missing_path(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(BadInput, match="nope.txt"):
        cal.load_text(str(missing))


def test_not_utf8(tmp_path):
    p = tmp_path / "bin.txt"
    p.write_bytes(b"abc\xff\xfe")
    with pytest.raises(BadInput, match="not UTF-8"):
        cal.load_text(str(p))


# --- tokenization ---------------------------------------------------------------------------------
def test_split_for_tokenizer_prefers_paragraphs():
    text = "a" * 50 + " word " + "b" * 10 + "\n\n" + "c" * 50
    pieces = cal.split_for_tokenizer(text, max_chars=100)
    assert "".join(pieces) == text
    assert pieces[0] == "a" * 50 + " word " + "b" * 10  # cut at the blank line, not the later space
    assert all(len(p) <= 100 for p in pieces)


def test_tokenize_chunked_equals_whole(tokenizer):
    text = long_text()
    assert len(cal.split_for_tokenizer(text)) > 3  # chunking really happens
    ids = cal.tokenize(text, tokenizer)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert ids.tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert torch.equal(ids, cal.tokenize(text, tokenizer))


# --- windows --------------------------------------------------------------------------------------
def test_sample_windows_deterministic_and_contiguous():
    ids = torch.arange(1000)
    a = cal.sample_windows(ids, n=16, seqlen=32, seed=0)
    assert a.shape == (16, 32) and a.dtype == torch.long
    assert torch.equal(a, cal.sample_windows(ids, n=16, seqlen=32, seed=0))
    assert not torch.equal(a, cal.sample_windows(ids, n=16, seqlen=32, seed=1))
    # Each window is a contiguous slice starting in [0, len - seqlen - 1] (GPTQ convention).
    assert torch.equal(a - a[:, :1], torch.arange(32).expand(16, 32))
    assert int(a[:, 0].min()) >= 0 and int(a[:, 0].max()) <= 1000 - 32 - 1


def test_sample_windows_minimum_length_and_overlap():
    ids = torch.arange(33)
    w = cal.sample_windows(ids, n=5, seqlen=32, seed=3)  # only one start offset exists
    assert torch.equal(w, torch.arange(32).expand(5, 32))
    big = cal.sample_windows(torch.arange(100), n=50, seqlen=20, seed=0)  # 10x the corpus: allowed
    assert big.shape == (50, 20)


def test_sample_windows_too_short():
    with pytest.raises(BadInput, match=r"has 32 tokens, fewer than seqlen \+ 1 = 33"):
        cal.sample_windows(torch.arange(32), n=1, seqlen=32, seed=0)
    with pytest.raises(BadInput):
        cal.sample_windows(torch.arange(100), n=0, seqlen=8, seed=0)


def test_eval_windows_non_overlapping_all():
    ids = torch.arange(1050)
    w = cal.eval_windows(ids, seqlen=100)
    assert w.shape == (10, 100)
    assert torch.equal(w.flatten(), torch.arange(1000))  # consecutive, non-overlapping, tail dropped


def test_eval_windows_evenly_spaced_cover_start_and_end():
    ids = torch.arange(100 * 37 + 5)
    w = cal.eval_windows(ids, seqlen=100, max_windows=7)
    assert w.shape == (7, 100)
    starts = (w[:, 0] // 100).tolist()
    assert starts[0] == 0 and starts[-1] == 36
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert min(gaps) >= 1 and max(gaps) - min(gaps) <= 1
    assert all(int(s) % 100 == 0 for s in w[:, 0])  # aligned to the non-overlapping grid
    assert torch.equal(cal.eval_windows(ids, 100, max_windows=1000), cal.eval_windows(ids, 100))
    assert cal.eval_windows(ids, 100, max_windows=1)[0, 0] == 0


def test_eval_windows_too_short():
    with pytest.raises(BadInput, match="fewer than one window"):
        cal.eval_windows(torch.arange(50), seqlen=64)


# --- calibration sets -----------------------------------------------------------------------------
def test_build_calibration_set_provenance(tmp_path, tokenizer):
    p = tmp_path / "calib.txt"
    p.write_text(long_text())
    cs = cal.build_calibration_set(str(p), tokenizer, n=8, seqlen=64, seed=0)
    assert cs.windows.shape == (8, 64)
    prov = cs.provenance
    assert prov["text_sha256"] == cal.sha256_bytes(p.read_bytes().strip() + b"\n")
    assert prov["n"] == 8 and prov["seqlen"] == 64 and prov["seed"] == 0
    assert prov["tokenizer"]["sha256"] and prov["n_tokens"] > 64
    again = cal.build_calibration_set(str(p), tokenizer, n=8, seqlen=64, seed=0)
    assert again.provenance_hash() == cs.provenance_hash()
    other = cal.build_calibration_set(str(p), tokenizer, n=8, seqlen=64, seed=1)
    assert other.provenance_hash() != cs.provenance_hash()
    # The same text reached through another path hashes the same.
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "x.txt").write_text(p.read_text())
    via_dir = cal.build_calibration_set(str(copy), tokenizer, n=8, seqlen=64, seed=0)
    assert via_dir.provenance_hash() == cs.provenance_hash()


def test_calibration_set_store_roundtrip(tmp_path, tokenizer):
    from squeezeflow.store import LocalStore

    p = tmp_path / "calib.txt"
    p.write_text(long_text())
    cs = cal.build_calibration_set(str(p), tokenizer, n=4, seqlen=32, seed=7)
    store = LocalStore(tmp_path / "store")
    ref = cs.put(store)
    back = cal.CalibrationSet.get(store, ref)
    assert torch.equal(back.windows, cs.windows)
    assert back.provenance == cs.provenance
    assert cs.put(store) == ref  # deterministic bytes: same object


# --- S3 -------------------------------------------------------------------------------------------
@pytest.fixture
def moto_s3(moto_server):
    moto_server.create_bucket(Bucket="corpus")
    return moto_server


def test_s3_prefix(moto_s3):
    c = moto_s3
    c.put_object(Bucket="corpus", Key="calib/b.txt", Body=b"second")
    c.put_object(Bucket="corpus", Key="calib/a.txt", Body=b"first")
    c.put_object(Bucket="corpus", Key="calib/z/c.jsonl",
                 Body=(json.dumps({"text": "third"}) + "\n" + json.dumps({"text": "fourth"})).encode())
    c.put_object(Bucket="corpus", Key="calib/readme.md", Body=b"ignored")
    c.put_object(Bucket="corpus", Key="calibration-other/x.txt", Body=b"not under the prefix")
    src = cal.load_text("s3://corpus/calib")
    assert src.text == "first\n\nsecond\n\nthird\n\nfourth\n"
    assert src.n_docs == 4 and src.origin == "s3://corpus/calib"
    assert cal.load_text("s3://corpus/calib/").sha256 == src.sha256


def test_s3_errors(moto_s3):
    with pytest.raises(BadInput, match="is empty"):
        cal.load_text("s3://corpus/nothing-here")
    with pytest.raises(BadInput, match="NoSuchBucket"):
        cal.load_text("s3://no-such-bucket/x")
    moto_s3.put_object(Bucket="corpus", Key="bad/x.jsonl", Body=b'{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(BadInput, match=r"s3://corpus/bad/x.jsonl: line 2"):
        cal.load_text("s3://corpus/bad")


# --- sources are identified by their text, never by their name ------------------------------------
def test_source_digest_is_the_texts_sha256(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(long_text(600))
    first = cal.source_digest(str(p))
    assert first == cal.load_text(str(p)).sha256
    p.write_text(long_text(600).replace("fox", "cat"))   # same path, new text
    assert cal.source_digest(str(p)) != first
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "only.txt").write_text(p.read_text())   # same text by another route
    assert cal.source_digest(str(tmp_path / "d")) == cal.source_digest(str(p))
    with pytest.raises(BadInput, match="not found"):
        cal.source_digest(str(tmp_path / "missing.txt"))


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_non_regular_calibration_path_is_one_line(kind, tmp_path):
    import os

    p = tmp_path / "corpus.txt"
    os.mkfifo(p) if kind == "fifo" else p.symlink_to("/dev/zero")
    with pytest.raises(BadInput, match="not a regular file"):
        cal.load_text(str(p))


def test_a_rerun_after_the_calibration_file_changed_uses_the_new_text(tiny_model, tmp_path):
    """The reported case: a calibration file edited between two runs; the second run's calibrate
    stage must sample the new text, not reuse the windows remembered for the old one."""
    from squeezeflow import dag, job
    from squeezeflow.config import CalibrationSpec, EvalSpec, ModelRef
    from squeezeflow.store import LocalStore

    store = LocalStore(tmp_path / "store")
    corpus = tmp_path / "corpus.txt"
    spec, ev = CalibrationSpec(source=str(corpus), n_samples=2, seqlen=16, seed=0), EvalSpec(seqlen=16, max_windows=1)

    def calibrate_once():
        stage = dag.plan(job.preflight(ModelRef(ref=str(tiny_model)), "rtn-w4g32", spec, ev))[0]
        assert stage.kind == "calibrate"
        ref, _ = dag.execute(store, "calibrate", stage.inputs)
        return cal.CalibrationSet.get(store, ref).provenance["text_sha256"]

    corpus.write_text(long_text(600))
    assert calibrate_once() == cal.source_digest(str(corpus))
    corpus.write_text(long_text(600).replace("fox", "cat"))
    assert calibrate_once() == cal.source_digest(str(corpus))
