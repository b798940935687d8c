"""Bad input fails fast: exit status 2, one clear line on stderr, before any heavy work or server start,
and nothing is written to the artifact store."""
import os
import subprocess
import sys
import time

import pytest

from sf_testing import tally


def run_cli(args, env_extra=None, tmp_path=None):
    env = dict(os.environ)
    env.update(env_extra or {})
    store = tmp_path / "store"
    env["SQUEEZEFLOW_STORE"] = str(store)
    env["SQUEEZEFLOW_SERVICES"] = str(tmp_path / "services")  # an embedded server must not be started
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "squeezeflow.cli", *args], capture_output=True, text=True,
                       env=env, timeout=120)
    return p, time.perf_counter() - t, store


CASES = {
    # model
    "missing model path": (["compress", "/nonexistent/model", "--recipe", "rtn-w4g64"], "does not exist"),
    "unknown model name": (["compress", "llama-7b", "--recipe", "rtn-w4g64"], "model path 'llama-7b' does not exist"),
    "model dir without config.json": (["compress", "{nocfg}", "--recipe", "rtn-w4g32"], "has no config.json"),
    "pickled model weights": (["compress", "{pickled}", "--recipe", "rtn-w4g32"], "pickled weights are refused"),
    "model name the registry cannot hold": (["compress", "{spaced}", "--recipe", "rtn-w4g32"], "invalid model 'tiny llama'"),
    # recipe presets
    "bits 1": (["compress", "{tiny}", "--recipe", "rtn-w1g32"], "bits must be between 2 and 8, got 1"),
    "bits 9": (["compress", "{tiny}", "--recipe", "rtn-w9g32"], "bits must be between 2 and 8, got 9"),
    "group does not divide": (["compress", "{tiny}", "--recipe", "rtn-w4g48"], "group size 48 does not divide"),
    "group 0": (["compress", "{tiny}", "--recipe", "rtn-w4g0"], "group_size must be positive"),
    "unknown recipe": (["compress", "{tiny}", "--recipe", "awq-w4g32"], "unknown recipe"),
    "N:M that does not divide": (["compress", "{tiny}", "--recipe", "nowag-p5:7"], "divisible by 7"),
    "sparsity 100%": (["compress", "{tiny}", "--recipe", "wanda-p100"], "unknown recipe"),
    "VQ codebook too large": (["compress", "{tiny}", "--recipe", "nowag-vq3d8"], "too large"),
    # recipe YAML
    "YAML file missing": (["compress", "{tiny}", "--recipe", "{dir}/missing.yaml"], "does not exist"),
    "YAML syntax error": (["compress", "{tiny}", "--recipe", "{dir}/syntax.yaml"], "is not valid YAML at line 3"),
    "YAML not a mapping": (["compress", "{tiny}", "--recipe", "{dir}/list.yaml"], "must hold a mapping"),
    "YAML unknown method": (["compress", "{tiny}", "--recipe", "{dir}/unknown.yaml"], "'awq' found using 'method' does not match"),
    "YAML unknown field": (["compress", "{tiny}", "--recipe", "{dir}/extra.yaml"], "colour: Extra inputs are not permitted"),
    "YAML bits not a number": (["compress", "{tiny}", "--recipe", "{dir}/bits.yaml"], "bits: Input should be a valid integer"),
    "YAML no methods": (["compress", "{tiny}", "--recipe", "{dir}/empty.yaml"], "methods: List should have at least 1 item"),
    "YAML recipe name with a space": (["compress", "{tiny}", "--recipe", "{dir}/spaced.yaml"], "recipe name 'my recipe'"),
    # calibration and evaluation
    "empty calibration corpus": (["compress", "{tiny}", "--recipe", "rtn-w4g32", "--calibration", "{empty}"], "empty"),
    "missing calibration file": (["compress", "{tiny}", "--recipe", "rtn-w4g32", "--calibration", "{dir}/none.txt"], "not found"),
    "calibration JSONL line not JSON": (["compress", "{tiny}", "--recipe", "rtn-w4g32", "--calibration", "{dir}/bad.jsonl"], "line 2 is not valid JSON"),
    "calibration JSONL without text": (["compress", "{tiny}", "--recipe", "rtn-w4g32", "--calibration", "{dir}/notext.jsonl"], 'no string field "text"'),
    "binary calibration file": (["compress", "{tiny}", "--recipe", "rtn-w4g32", "--calibration", "{dir}/binary.txt"], "is not UTF-8 text"),
    "calibration on unreachable S3": (["compress", "{tiny}", "--recipe", "rtn-w4g32", "--calibration", "s3://corpus/x", "--no-publish"], "unreachable"),
    "seqlen above max": (["compress", "{tiny}", "--recipe", "rtn-w4g32", "--seqlen", "4096"], "exceeds the model's maximum of 512"),
    "seqlen below 16": (["compress", "{tiny}", "--recipe", "rtn-w4g32", "--seqlen", "8"], "seqlen: Input should be greater than or equal to 16"),
    "seqlen not a number": (["compress", "{tiny}", "--recipe", "rtn-w4g32", "--seqlen", "abc"], "invalid int value: 'abc'"),
    "negative samples": (["compress", "{tiny}", "--recipe", "rtn-w4g32", "--calib-samples", "0"], "n_samples"),
    "calibration too large for memory": (["compress", "{smollm}", "--recipe", "rtn-w4g64", "--calib-samples", "100000", "--no-publish"], "GiB of activations"),
    "zero evaluation windows": (["compress", "{tiny}", "--recipe", "rtn-w4g32", "--eval-windows", "0"], "max_windows"),
    # destinations
    "unreachable S3": (["compress", "{tiny}", "--recipe", "rtn-w4g32", "--registry", "s3://nowhere/reg"], "unreachable"),
    "store not writable": (["compress", "{tiny}", "--recipe", "rtn-w4g32", "--store", "/proc/no-store", "--no-publish"], "is not a writable directory"),
    # command line and artifacts
    "missing --recipe": (["compress", "{tiny}"], "the following arguments are required: --recipe"),
    "unknown registry action": (["registry", "frobnicate"], "invalid choice: 'frobnicate'"),
    "sweep without recipes": (["sweep", "{tiny}", "--recipes", " , "], "needs at least one recipe"),
    "eval of a dir that is no artifact": (["eval", "{nocfg}"], "has no manifest.json"),
    "eval of a malformed ref": (["eval", "{dir}/no/such/artifact"], "bad registry ref"),
}

FILES = {
    "syntax.yaml": "name: x\nmethods: [\n",
    "list.yaml": "- a\n- b\n",
    "unknown.yaml": "name: x\nmethods:\n  - method: awq\n",
    "extra.yaml": "name: x\nmethods:\n  - method: rtn\n    bits: 4\n    group_size: 32\n    colour: red\n",
    "bits.yaml": "name: x\nmethods:\n  - method: rtn\n    bits: four\n",
    "empty.yaml": "name: x\nmethods: []\n",
    "spaced.yaml": "name: my recipe\nmethods:\n  - method: rtn\n    bits: 4\n",
    "bad.jsonl": '{"text": "a sentence"}\nnot json\n',
    "notext.jsonl": '{"body": "a sentence"}\n',
}


def _inputs(tmp_path, tiny_model):
    d = tmp_path / "inputs"
    d.mkdir()
    for name, text in FILES.items():
        (d / name).write_text(text)
    (d / "binary.txt").write_bytes(bytes(range(128, 256)) * 8)
    (tmp_path / "nocfg").mkdir()
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tiny_model / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    return d


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2(case, tiny_model, smollm_path, tmp_path):
    args, expected = CASES[case]
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    spaced = tmp_path / "tiny llama"
    if "{spaced}" in args:
        spaced.symlink_to(tiny_model, target_is_directory=True)
    d = _inputs(tmp_path, tiny_model)
    args = [a.format(tiny=tiny_model, empty=empty, spaced=spaced, dir=d, nocfg=tmp_path / "nocfg",
                     pickled=tmp_path / "pickled", smollm=smollm_path) for a in args]
    # Port 9 on loopback (discard) has no S3 server: connection refused straight away.
    p, elapsed, store = run_cli(args, {"SQUEEZEFLOW_S3_ENDPOINT": "http://127.0.0.1:9"}, tmp_path)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    problems = []
    if p.returncode != 2:
        problems.append(f"exit {p.returncode}")
    if not (len(lines) == 1 and lines[0].startswith("squeezeflow: error:") and expected in lines[0]):
        problems.append(f"stderr {p.stderr[-2000:]!r}")
    if elapsed >= 60:
        problems.append(f"took {elapsed:.0f} s")
    if store.exists() and any(store.rglob("*")):
        problems.append("left files in the store")
    if (tmp_path / "services").exists():
        problems.append("started an embedded server")
    tally("bad inputs rejected cleanly", not problems)
    assert problems == [], case


FLOW_PARAMETERS = {
    "calibration.n_samples": {"calibration": {"n_samples": 0}},
    "evaluation.seqlen": {"evaluation": {"seqlen": 4}},
    "calibration.seed": {"calibration": {"seed": "abc"}},
    "destinations.publish": {"destinations": {"publish": "maybe"}},
    "model.trust_remote_code": {"model": {"ref": "smollm2-135m", "trust_remote_code": "sometimes"}},
}


@pytest.mark.parametrize("field", list(FLOW_PARAMETERS))
def test_bad_flow_parameters_are_refused_by_name(field):
    """What a run started from the Prefect UI's form or the API gets: the flow's own parameter validation
    refuses the run before it starts, naming the field."""
    from prefect.exceptions import ParameterTypeError

    from squeezeflow.flows.compress import compress_flow

    with pytest.raises(ParameterTypeError) as e:
        compress_flow.validate_parameters(FLOW_PARAMETERS[field])
    ok = field.split(".")[-1] in str(e.value)
    tally("bad inputs rejected cleanly", ok)
    assert ok, str(e.value)
