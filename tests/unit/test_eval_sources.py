"""Evaluation on the user's own text: --eval sources (file, .jsonl, directory, s3:// prefix) go through the
same reader as calibration, are checked by preflight in one line, recorded by name and sha256 in the
manifest, shown next to the base model in the report, re-read by `squeezeflow eval`, and the nightly gate
evaluates on exactly the sources (and text) production recorded."""
import copy
import json
import random
from pathlib import Path

import pytest

from squeezeflow import gate, pipeline
from squeezeflow.calibration import load_text
from squeezeflow.cli import main
from squeezeflow.cli_next import eval_sources
from squeezeflow.config import CalibrationSpec, EvalSpec, ModelRef
from squeezeflow.errors import BadInput
from squeezeflow.store import LocalStore
from sf_testing import run_stages

CALIB = CalibrationSpec(n_samples=4, seqlen=32, seed=0)
WORDS = ("lantern harbor quietly seven orchard velvet minute granite whisper copper meadow ladder crimson "
         "thunder pocket silver engine garden mirror ticket").split()


def prose(seed: int, sentences: int = 40) -> str:
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(sentences))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("own-text")
    (root / "my.txt").write_text(prose(1))
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": prose(s, 15)}) + "\n" for s in (2, 3)))
    (root / "folder" / "sub").mkdir(parents=True)
    (root / "folder" / "a.txt").write_text(prose(4, 20))
    (root / "folder" / "sub" / "b.jsonl").write_text(json.dumps({"text": prose(5, 20)}) + "\n")
    (root / "other.txt").write_text(prose(6))
    return root


@pytest.fixture(scope="module")
def run(tiny_model, sources, tmp_path_factory):
    splits = tuple(str(sources / n) for n in ("my.txt", "docs.jsonl", "folder"))
    job = pipeline.preflight(ModelRef(ref=str(tiny_model)), "rtn-w4g32", CALIB,
                             EvalSpec(splits=splits, seqlen=32, max_windows=2, kl_windows=1))
    store = LocalStore(tmp_path_factory.mktemp("store"))
    out = run_stages(store, job)
    manifest = pipeline.artifact_json(store, out["artifact"], "manifest.json")
    return job, store, out, manifest


def test_own_sources_are_named_and_hashed_in_the_manifest(run, sources):
    job, _, _, manifest = run
    protocols = manifest["metrics"]["protocol"]["evaluation"]
    assert sorted(protocols) == sorted(job.evaluation.splits)  # the manifest is canonical JSON: keys sorted
    for split, p in protocols.items():
        assert p["corpus_sha256"] == load_text(split).sha256 == job.evaluation_sha256[split]
    # The directory is every .txt/.jsonl under it, in path order, as for calibration.
    assert load_text(str(sources / "folder")).text.startswith(prose(4, 20))
    for metrics in (manifest["baseline"], manifest["metrics"]):
        assert set(metrics["perplexity"]) == set(job.evaluation.splits)
        assert all(v > 1 for v in metrics["perplexity"].values())


def test_report_shows_own_text_next_to_the_base_model(run, sources):
    _, store, out, manifest = run
    report = store.get_bytes(store.get_tree(out["artifact"])["report/report.md"]).decode()
    header = next(line for line in report.splitlines() if line.startswith("| model |"))
    assert "ppl my.txt" in header and "ppl docs.jsonl" in header and "ppl folder" in header
    rows = [line for line in report.splitlines() if line.startswith(("| fp32 |", "| rtn-w4g32 |"))]
    assert len(rows) == 2
    base_ppl = manifest["baseline"]["perplexity"][str(sources / "my.txt")]
    assert f"{base_ppl:.3f}" in rows[0]
    assert f"`my.txt` (`{sources / 'my.txt'}`)" in report  # the protocol line names the full source


def test_eval_command_reads_recorded_and_new_sources(run, sources, capsys):
    _, store, out, manifest = run
    artifact = store.materialize(out["artifact"])
    assert main(["eval", str(artifact), "--kl-windows", "0"]) == 0
    printed = capsys.readouterr().out
    recorded = manifest["metrics"]["perplexity"][str(sources / "my.txt")]
    assert f"my.txt: perplexity {recorded:.4f} (recorded {recorded:.4f})" in printed
    assert main(["eval", str(artifact), "--eval", str(sources / "other.txt"), "--kl-windows", "0"]) == 0
    printed = capsys.readouterr().out
    assert "other.txt: perplexity" in printed and "not in the manifest" in printed


def test_gate_evaluates_on_productions_recorded_sources(run, tiny_model, sources, tmp_path):
    job, _, _, manifest = run
    spec = gate.eval_spec(manifest)
    assert sorted(spec.splits) == sorted(job.evaluation.splits) and spec.seqlen == 32 and spec.max_windows == 2
    again = pipeline.preflight(ModelRef(ref=str(tiny_model)), "rtn-w4g32", CALIB, spec)
    gate.check_recorded_texts(manifest, again.evaluation_sha256)  # same text: accepted
    # A production whose evaluation file has changed since it was measured: one line naming it.
    edited = tmp_path / "edited.txt"
    edited.write_text(prose(7))
    moved = copy.deepcopy(manifest)
    protocols = moved["metrics"]["protocol"]["evaluation"]
    protocols[str(edited)] = protocols.pop(str(sources / "my.txt"))
    job2 = pipeline.preflight(ModelRef(ref=str(tiny_model)), "rtn-w4g32", CALIB, gate.eval_spec(moved))
    with pytest.raises(BadInput, match="edited.txt' no longer holds the text production was evaluated on"):
        gate.check_recorded_texts(moved, job2.evaluation_sha256)


def test_eval_sources_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("x")
    assert eval_sources("mine.txt, moby-dick,s3://b/p,mine.txt") == (str(tmp_path / "mine.txt"), "moby-dick", "s3://b/p")
    assert eval_sources(None) is None
    with pytest.raises(BadInput, match="at least one source"):
        eval_sources(" , ")


@pytest.mark.parametrize("make, expected", [
    (lambda d: str(d / "missing.txt"), "evaluation source '.*missing.txt' not found"),
    (lambda d: (d / "empty.txt").write_text("") and "" or str(d / "empty.txt"), "evaluation source '.*empty.txt' is empty"),
    (lambda d: (d / "bad.jsonl").write_text('{"txt": 1}\n') and str(d / "bad.jsonl"), "bad.jsonl: line 1 has no string"),
    (lambda d: " , ", "--eval needs at least one source"),
])
def test_bad_eval_source_is_one_line_before_any_server(tiny_model, tmp_path, capsys, monkeypatch, make, expected):
    import re

    monkeypatch.setattr("squeezeflow.cli._start_servers", lambda *a: pytest.fail("servers started"))
    code = main(["compress", str(tiny_model), "--recipe", "rtn-w4g32", "--calib-samples", "4", "--seqlen", "32",
                 "--eval", make(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and re.search(expected, err), err


@pytest.fixture
def moto_s3(moto_server):
    moto_server.create_bucket(Bucket="texts")
    return moto_server


def test_s3_prefix_as_evaluation_source(moto_s3, tiny_model):
    moto_s3.put_object(Bucket="texts", Key="held/a.txt", Body=prose(8).encode())
    moto_s3.put_object(Bucket="texts", Key="held/b.jsonl", Body=(json.dumps({"text": prose(9)}) + "\n").encode())
    spec = EvalSpec(splits=("s3://texts/held",), seqlen=32, max_windows=2)
    job = pipeline.preflight(ModelRef(ref=str(tiny_model)), "rtn-w4g32", CALIB, spec)
    assert job.evaluation_sha256["s3://texts/held"] == load_text("s3://texts/held").sha256
    with pytest.raises(BadInput, match="evaluation source 's3://texts/none' is empty"):
        pipeline.preflight(ModelRef(ref=str(tiny_model)), "rtn-w4g32", CALIB,
                           EvalSpec(splits=("s3://texts/none",), seqlen=32))


def test_next_steps_name_the_local_copy_and_commands_that_work(run, tmp_path):
    import shlex
    import subprocess
    import sys

    from squeezeflow.cli_next import next_steps

    _, store, out, _ = run
    result = pipeline.summarize(store, out["artifact"], None, 1.0)
    lines = next_steps(result, str(store.root))
    local = lines[1].split("local copy: ", 1)[1]
    assert Path(local, "manifest.json").is_file()
    assert lines[0] == "rtn-w4g32: (not published)" and not any("registry pull" in line for line in lines)
    commands = [line.strip() for line in lines]
    assert f"squeezeflow export {local} --dest ./rtn-w4g32-export" in commands
    assert f"squeezeflow eval {local}" in commands
    load = next(line for line in lines if "python -c" in line).strip()
    code = shlex.split(load)[2]  # the printed command, as a shell would pass it
    proc = subprocess.run([sys.executable, "-c", code + "; print(type(model).__name__)"], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "ForCausalLM" in proc.stdout, proc.stderr[-2000:]
    published = dict(result, artifact=dict(result["artifact"], uri="s3://bucket/models/tiny/rtn-w4g32/abc"))
    lines = next_steps(published, str(store.root))
    assert "    squeezeflow registry pull s3://bucket/models/tiny/rtn-w4g32/abc --dest ./rtn-w4g32" in lines
    assert "    squeezeflow eval s3://bucket/models/tiny/rtn-w4g32/abc" in lines


def test_split_labels_are_file_names_unless_two_sources_share_one():
    from squeezeflow.evaluation.comparison import comparison_rows
    from squeezeflow.evaluation.report import split_label

    splits = ["/a/my.txt", "moby-dick", "/b/data", "/c/data/", "s3://bucket/held"]
    assert [split_label(s, splits) for s in splits] == ["my.txt", "moby-dick", "/b/data", "/c/data/", "held"]
    row = comparison_rows([{"recipe": "r", "bits_per_weight": 4.0, "size_bytes": 1,
                            "perplexity": {s: 2.0 for s in splits}}])[0]
    assert {"ppl_my.txt", "ppl_moby-dick", "ppl_/b/data", "ppl_/c/data/", "ppl_held"} <= set(row)


def test_ui_form_offers_evaluation_sources():
    from prefect.utilities.callables import parameter_schema

    from squeezeflow.flows.compress import compress_flow

    schema = parameter_schema(compress_flow.fn).model_dump_for_openapi()
    splits = schema["definitions"]["EvalSpec"]["properties"]["splits"]
    assert splits["title"] == "Evaluation sources" and "s3://" in splits["description"]
    assert splits["minItems"] == 1 and splits["default"] == ["sotu-2000-2021", "moby-dick"]
