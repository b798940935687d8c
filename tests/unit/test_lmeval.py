"""`squeezeflow eval ARTIFACT --lm-eval TASKS --lm-eval-include DIR`: a local lm-evaluation-harness task
(YAML in a temp dir, local JSONL data, no network) runs on a packed artifact loaded through
squeezeflow.load, and its accuracy is the one our own log-likelihoods give; missing lm_eval, unknown
tasks and a missing include dir are one line each, before the model loads."""
import json
import sys

import pytest
import torch

from squeezeflow import pipeline
from squeezeflow.cli import main
from squeezeflow.config import CalibrationSpec, EvalSpec, ModelRef
from squeezeflow.store import LocalStore
from sf_testing import run_stages

pytest.importorskip("lm_eval")

ITEMS = [{"context": "The harbor lights were", "choices": ["bright", "copper", "ladder"], "label": 0},
         {"context": "She opened the old", "choices": ["door", "thunder", "minute"], "label": 1},
         {"context": "Seven ships sailed into the", "choices": ["bay", "orchard", "velvet"], "label": 2},
         {"context": "He wrote a long", "choices": ["letter", "granite", "meadow"], "label": 0}]
TASK_YAML = """\
task: sqf_local_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def artifact(tiny_model, tmp_path_factory):
    job = pipeline.preflight(ModelRef(ref=str(tiny_model)), "rtn-w4g32", CalibrationSpec(n_samples=4, seqlen=32),
                             EvalSpec(seqlen=32, max_windows=1, kl_windows=0))
    store = LocalStore(tmp_path_factory.mktemp("store"))
    return store.materialize(run_stages(store, job)["artifact"])


@pytest.fixture
def tasks_dir(tmp_path, monkeypatch):
    for var, value in (("HF_DATASETS_OFFLINE", "1"), ("HF_HUB_OFFLINE", "1"),
                       ("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))):
        monkeypatch.setenv(var, value)
    d = tmp_path / "tasks"
    d.mkdir()
    (d / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in ITEMS))
    (d / "sqf_local_choice.yaml").write_text(TASK_YAML.format(data=d / "items.jsonl"))
    return d


def our_accuracy(artifact) -> float:
    """Multiple choice as lm-eval scores it (acc): the choice with the highest summed log-likelihood of
    ' ' + choice after the context, no BOS, continuation tokens = tokens(context + continuation) after
    tokens(context)."""
    import squeezeflow

    model, tok = squeezeflow.load(str(artifact), tokenizer=True)
    correct = 0
    with torch.no_grad():
        for item in ITEMS:
            scores = []
            for choice in item["choices"]:
                ctx = tok(item["context"], add_special_tokens=False).input_ids
                whole = tok(item["context"] + " " + choice, add_special_tokens=False).input_ids
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
                scores.append(sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole))))
            correct += int(max(range(len(scores)), key=scores.__getitem__) == item["label"])
    return correct / len(ITEMS)


def test_local_task_runs_on_a_packed_artifact(artifact, tasks_dir, capsys):
    code = main(["--json", "eval", str(artifact), "--kl-windows", "0", "--lm-eval", "sqf_local_choice",
                 "--lm-eval-include", str(tasks_dir)])
    out = capsys.readouterr().out
    assert code == 0
    report = json.loads(out)["results"][0]["lm_eval"]
    acc = report["results"]["sqf_local_choice"]["acc,none"]
    assert acc == pytest.approx(our_accuracy(artifact))
    assert report["tasks"] == ["sqf_local_choice"] and report["lm_eval_version"]
    assert report["settings"]["include"] == str(tasks_dir)


def test_lm_eval_summary_is_printed(artifact, tasks_dir, capsys):
    assert main(["eval", str(artifact), "--kl-windows", "0", "--lm-eval", "sqf_local_choice",
                 "--lm-eval-include", str(tasks_dir), "--lm-eval-limit", "2"]) == 0
    out = capsys.readouterr().out
    assert "lm-eval sqf_local_choice: acc " in out and "perplexity" in out


@pytest.mark.parametrize("argv, expected", [
    (["--lm-eval", "no_such_task_xyz"], "lm-eval does not know the task(s) no_such_task_xyz"),
    (["--lm-eval", "sqf_local_choice", "--lm-eval-include", "/nonexistent/tasks"], "is not a directory"),
    (["--lm-eval", " , "], "at least one task name"),
])
def test_bad_lm_eval_arguments_are_one_line(artifact, argv, expected, capsys, monkeypatch):
    monkeypatch.setattr("squeezeflow.registry.verify_dir", lambda *a, **k: pytest.fail("artifact read first"))
    assert main(["eval", str(artifact), *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and expected in err, err


def test_missing_lm_eval_is_one_line(artifact, capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an environment without it raises: ImportError
    assert main(["eval", str(artifact), "--lm-eval", "hellaswag"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "pip install 'squeezeflow[lmeval]'" in err, err
