"""Bad input fails fast: exit status 2, one clear line on stderr, before any heavy work or server start,
and nothing is written to the artifact store."""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bad_checkpoints import BAD_CHECKPOINTS, make_bad_checkpoint, make_loop_dir, make_micro_llama
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
    "YAML bits not a number": (["compress", "{tiny}", "--recipe", "{dir}/bits.yaml"], "bits: expected an integer, got string 'four'"),
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
    "seqlen below 16": (["compress", "{tiny}", "--recipe", "rtn-w4g32", "--seqlen", "8"], "--seqlen: 8 is out of range 16..1048576"),
    "seqlen not a number": (["compress", "{tiny}", "--recipe", "rtn-w4g32", "--seqlen", "abc"], "expected a whole number from 16 to 1048576, got 'abc'"),
    "negative samples": (["compress", "{tiny}", "--recipe", "rtn-w4g32", "--calib-samples", "0"], "--calib-samples: 0 is out of range 1..100000"),
    "calibration too large for memory": (["compress", "{smollm}", "--recipe", "rtn-w4g64", "--calib-samples", "100000", "--no-publish"], "GiB of activations"),
    "zero evaluation windows": (["compress", "{tiny}", "--recipe", "rtn-w4g32", "--eval-windows", "0"], "--eval-windows: 0 is out of range"),
    # destinations
    "unreachable S3": (["compress", "{tiny}", "--recipe", "rtn-w4g32", "--registry", "s3://nowhere/reg"], "unreachable"),
    "shard size not a size": (["compress", "{tiny}", "--recipe", "rtn-w4g32", "--max-shard-size", "3parsecs"], "max shard size '3parsecs' is not a size"),
    "shard size too small": (["sweep", "{tiny}", "--recipes", "rtn-w4g32", "--max-shard-size", "10KB"], "below the minimum of 1 MiB"),
    "memory limit below the plan": (["compress", "{tiny}", "--recipe", "rtn-w4g32", "--no-publish"], "SQUEEZEFLOW_MEMORY_LIMIT is 0.1 GiB", {"SQUEEZEFLOW_MEMORY_LIMIT": "100MiB"}),
    "store not writable": (["compress", "{tiny}", "--recipe", "rtn-w4g32", "--store", "/proc/no-store", "--no-publish"], "is not a writable directory"),
    # command line and artifacts
    "missing --recipe": (["compress", "{tiny}"], "the following arguments are required: --recipe"),
    "unknown registry action": (["registry", "frobnicate"], "invalid choice: 'frobnicate'"),
    "sweep without recipes": (["sweep", "{tiny}", "--recipes", " , "], "needs at least one recipe"),
    "eval of a dir that is no artifact": (["eval", "{nocfg}"], "has no manifest.json"),
    "eval of a malformed ref": (["eval", "{dir}/no/such/artifact"], "bad registry ref"),
    # one fresh process per class of the in-process matrix below (test_bad_input_matrix)
    "checkpoint: truncated safetensors": (["compress", "{ck[file cut mid-tensor]}", "--recipe", "rtn-w4g32"], "is truncated"),
    "checkpoint: NaN weight": (["compress", "{ck[NaN in an fp32 weight]}", "--recipe", "rtn-w4g32"], "holds NaN or infinite values"),
    "checkpoint: dangling shard": (["compress", "{ck[dangling shard]}", "--recipe", "rtn-w4g32"], "which is missing"),
    "checkpoint: config layers disagree": (["compress", "{ck[config has more layers]}", "--recipe", "rtn-w4g32"], "num_hidden_layers=3"),
    "checkpoint: FIFO weights": (["compress", "{ck[weights a FIFO]}", "--recipe", "rtn-w4g32"], "is a FIFO"),
    "recipe: duplicate key": (["compress", "{tiny}", "--recipe", "{rec[bits twice]}"], "duplicate key 'bits'"),
    "recipe: alias bomb": (["compress", "{tiny}", "--recipe", "{rec[alias bomb]}"], "alias *a is not allowed"),
    "recipe: group_size true": (["compress", "{tiny}", "--recipe", "{rec[group_size true]}"], "group_size: expected an integer, got boolean True"),
    "recipe: NaN": (["compress", "{tiny}", "--recipe", "{rec[damp .nan]}"], "damp: must be a finite number"),
    "recipe: oversized file": (["compress", "{tiny}", "--recipe", "{rec[2 MiB of comments]}"], "over the limit of 1048576 bytes"),
    "calibration: FIFO": (["compress", "{tiny}", "--recipe", "rtn-w4g32", "--calibration", "{fifo}"], "not a regular file"),
    "calibration: /dev/zero": (["compress", "{tiny}", "--recipe", "rtn-w4g32", "--calibration", "/dev/zero"], "not a regular file"),
    "CLI: seed beyond 64 bits": (["compress", "{tiny}", "--recipe", "rtn-w4g32", "--seed", str(2**64)], "out of range 0.."),
    "credentials: corrupt AWS file": (["compress", "{tiny}", "--recipe", "rtn-w4g32", "--registry", "s3://x/y"], "Unable to parse config file"),
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
    args, expected, *env_case = CASES[case]
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    spaced = tmp_path / "tiny llama"
    if "{spaced}" in args:
        spaced.symlink_to(tiny_model, target_is_directory=True)
    d = _inputs(tmp_path, tiny_model)
    fifo = tmp_path / "calib.txt"
    os.mkfifo(fifo)
    args = [a.format(tiny=tiny_model, empty=empty, spaced=spaced, dir=d, nocfg=tmp_path / "nocfg",
                     pickled=tmp_path / "pickled", smollm=smollm_path, fifo=fifo,
                     ck=_Lazy(lambda kind, dest: make_bad_checkpoint(kind, make_micro_llama(tmp_path / "micro"), dest),
                              tmp_path / "ck"),
                     rec=_Lazy(_write_recipe, tmp_path / "rec")) for a in args]
    # Port 9 on loopback (discard) has no S3 server: connection refused straight away.
    env = {"SQUEEZEFLOW_S3_ENDPOINT": "http://127.0.0.1:9", **(env_case[0] if env_case else {})}
    if case == "credentials: corrupt AWS file":
        (tmp_path / "aws-credentials").write_text("[default\naws_access_key_id = x\n")
        env["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp_path / "aws-credentials")
    p, elapsed, store = run_cli(args, env, tmp_path)
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
    "destinations.max_shard_size": {"destinations": {"max_shard_size": "huge"}},
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


# ------------------------------------------------------------------------------------------------------
# The matrix: every class of bad input, many members each, through the CLI's own entry point in this
# process (a fresh interpreter per case would cost ~5-20 s each; the subprocess cases above prove each
# class also fails cleanly in a fresh process, before any server starts).
# ------------------------------------------------------------------------------------------------------
class _Lazy:
    """`"{ck[kind]}".format(ck=_Lazy(build, root))`: builds the input named `kind` under root on first use."""

    def __init__(self, build, root):
        self.build, self.root = build, root

    def __getitem__(self, kind):
        dest = self.root / re.sub(r"[^\w.-]+", "_", kind)
        if not os.path.lexists(dest) and not os.path.lexists(dest.with_suffix(".yaml")):
            self.root.mkdir(parents=True, exist_ok=True)
            return self.build(kind, dest)
        return dest.with_suffix(".yaml") if os.path.lexists(dest.with_suffix(".yaml")) else dest


RTN = "name: r\nmethods:\n  - method: rtn\n    bits: 4\n"
GPTQ = "name: r\nmethods:\n  - method: gptq\n    bits: 4\n"
# recipe file -> (its content: text, bytes, or a function making the file at the given path; error text)
BAD_RECIPES = {
    "bits twice": (RTN + "    bits: 8\n", "duplicate key 'bits' (first given at line 4)"),
    "name twice": (RTN + "name: s\n", "duplicate key 'name'"),
    "alias bomb": ("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                   "c: [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n" + RTN, "alias *a is not allowed"),
    "anchored method reused": ("name: r\nmethods:\n  - &m {method: rtn, bits: 4}\n  - *m\n", "alias *m is not allowed"),
    "merge key": ("name: r\nmethods:\n  - <<: {method: rtn}\n    bits: 4\n", "merge keys (<<) are not allowed"),
    "nesting 1000 deep": ("name: r\nmethods: " + "[" * 1000 + "]" * 1000 + "\n", "nesting deeper than 32 levels"),
    "non-string key": ("name: r\nmethods:\n  - method: rtn\n    4: bits\n", "keys must be strings"),
    "python object tag": ("name: !!python/object/apply:os.system ['true']\nmethods: []\n", "could not determine a constructor"),
    "two documents": (RTN + "---\n" + RTN, "but found another document"),
    "group_size true": (RTN + "    group_size: true\n", "group_size: expected an integer, got boolean True"),
    "group_size yes": (RTN + "    group_size: yes\n", "group_size: expected an integer, got boolean True"),
    "bits as a string": ("name: r\nmethods:\n  - method: rtn\n    bits: '4'\n", "bits: expected an integer, got string '4'"),
    "bits 4.0": ("name: r\nmethods:\n  - method: rtn\n    bits: 4.0\n", "bits: expected an integer, got number 4.0"),
    "bits 1.5": ("name: r\nmethods:\n  - method: rtn\n    bits: 1.5\n", "bits: expected an integer, got number 1.5"),
    "damp .nan": (GPTQ + "    damp: .nan\n", "damp: must be a finite number, got nan"),
    "damp .inf": (GPTQ + "    damp: .inf\n", "damp: must be a finite number, got inf"),
    "damp nan string": (GPTQ + "    damp: nan\n", "damp: expected a number, got string 'nan'"),
    "lambda -.inf": ("name: r\nmethods:\n  - method: backslash\n    lam: -.inf\n", "lam: must be a finite number"),
    "act_order 'yes' quoted": (GPTQ + "    act_order: 'yes'\n", "act_order: expected true or false, got string 'yes'"),
    "act_order 1": (GPTQ + "    act_order: 1\n", "act_order: expected true or false, got integer 1"),
    "n_m with a string": ("name: r\nmethods:\n  - method: wanda\n    n_m: ['2', 4]\n", "n_m: item 0: expected an integer"),
    "act_bits as a string": ("name: r\nmethods:\n  - method: quad\n    act_bits: '8'\n", "act_bits: expected one of 4, 6, 8, 16"),
    "seed 1e30": ("name: r\nmethods:\n  - method: quad\n    seed: 1e30\n", "seed: expected an integer, got number 1e+30"),
    "seed beyond 64 bits": ("name: r\nmethods:\n  - method: quad\n    seed: " + "9" * 30 + "\n", "out of the 64-bit range"),
    "nested base with a bool": ("name: r\nmethods:\n  - method: eg\n    base: {method: rtn, bits: true}\n",
                                "bits: expected an integer, got boolean True"),
    "2 MiB of comments": (("#" * 80 + "\n") * 26000 + RTN, "over the limit of 1048576 bytes"),
    "not UTF-8": (b"name: r\xff\nmethods: []\n", "is not UTF-8 text"),
    "a FIFO": (lambda p: os.mkfifo(p), "is a FIFO (named pipe), not a regular file"),
    "/dev/zero": (lambda p: os.symlink("/dev/zero", p), "is a character device, not a regular file"),
    "a symlink loop": (lambda p: (os.symlink(p.name + ".b", p), os.symlink(p.name, p.with_name(p.name + ".b"))),
                       "is a symlink loop"),
    "a directory": (lambda p: p.mkdir(), "is a directory, not a regular file"),
}


def _write_recipe(kind: str, dest: Path) -> Path:
    path = dest.with_suffix(".yaml")
    content = BAD_RECIPES[kind][0]
    if callable(content):
        content(path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def _calib_dir(kind: str, dest: Path) -> Path:
    dest.mkdir()
    files = {"empty": {}, "blank files": {"a.txt": " \n\n", "b.jsonl": "\n\n"}, "other files": {"x.csv": "a,b\n"},
             "jsonl text a number": {"a.jsonl": '{"text": 5}\n'}}[kind]
    for name, text in files.items():
        (dest / name).write_text(text)
    return dest


def _credentials(kind: str, dest: Path) -> Path:
    dest.mkdir()
    content = {"not JSON": "{identities", "no identities": "{}", "empty": "", "keys missing": '{"identities": [{}]}'}[kind]
    (dest / "s3-credentials.json").write_text(content)
    return dest


COMPRESS = ["compress", "{micro}", "--recipe", "rtn-w4g32"]
MATRIX = {
    **{f"checkpoint: {k}": (["compress", f"{{ck[{k}]}}", "--recipe", "rtn-w4g32"], expected)
       for k, (_, expected) in BAD_CHECKPOINTS.items()},
    "checkpoint: model path a symlink loop": (["compress", "{loop}", "--recipe", "rtn-w4g32"], "is a symlink loop"),
    "checkpoint: model path a file": (["compress", "{micro}/config.json", "--recipe", "rtn-w4g32"], "is not a directory"),
    **{f"recipe: {k}": (["compress", "{micro}", "--recipe", f"{{rec[{k}]}}"], expected)
       for k, (_, expected) in BAD_RECIPES.items()},
    **{f"calibration: directory with {k}": ([*COMPRESS, "--calibration", f"{{cal[{k}]}}"], expected)
       for k, expected in {"empty": "no .txt or .jsonl files", "blank files": "is empty",
                           "other files": "no .txt or .jsonl files", "jsonl text a number": 'no string field "text"'}.items()},
    "CLI: negative samples": ([*COMPRESS, "--calib-samples", "-5"], "--calib-samples: -5 is out of range 1..100000"),
    "CLI: samples above the limit": ([*COMPRESS, "--calib-samples", "100001"], "100001 is out of range 1..100000"),
    "CLI: samples in float notation": ([*COMPRESS, "--calib-samples", "1e3"], "expected a whole number from 1 to 100000, got '1e3'"),
    "CLI: samples with 40 digits": ([*COMPRESS, "--calib-samples", "9" * 40], "is out of range 1..100000"),
    "CLI: seqlen zero": ([*COMPRESS, "--seqlen", "0"], "--seqlen: 0 is out of range 16..1048576"),
    "CLI: seqlen negative": ([*COMPRESS, "--seqlen", "-512"], "--seqlen: -512 is out of range"),
    "CLI: seqlen huge": ([*COMPRESS, "--seqlen", "99999999"], "--seqlen: 99999999 is out of range"),
    "CLI: negative evaluation windows": ([*COMPRESS, "--eval-windows", "-1"], "--eval-windows: -1 is out of range"),
    "CLI: negative seed": ([*COMPRESS, "--seed", "-1"], "--seed: -1 is out of range"),
    "CLI: zero Dask workers": ([*COMPRESS, "--runner", "dask", "--dask-workers", "0"], "--dask-workers: 0 is out of range 1..1024"),
    "CLI: sweep with zero samples": (["sweep", "{micro}", "--recipes", "rtn-w4g32", "--calib-samples", "0"], "--calib-samples: 0"),
    "CLI: eval with negative KL windows": (["eval", "{micro}", "--kl-windows", "-1"], "--kl-windows: -1 is out of range"),
    "CLI: eval with negative cloze items": (["eval", "{micro}", "--cloze-items", "-3"], "--cloze-items: -3 is out of range"),
    "CLI: eval with zero windows": (["eval", "{micro}", "--eval-windows", "0"], "--eval-windows: 0 is out of range"),
    **{f"credentials: embedded S3 file {k}": ([*COMPRESS], "credentials file")
       for k in ("not JSON", "no identities", "empty", "keys missing")},
    "credentials: AWS config file corrupt": ([*COMPRESS, "--registry", "s3://x/y"], "Unable to parse config file"),
}


@pytest.fixture(scope="module")
def micro_model(tmp_path_factory) -> Path:
    return make_micro_llama(tmp_path_factory.mktemp("micro") / "micro-llama")


@pytest.mark.parametrize("case", list(MATRIX))
def test_bad_input_matrix(case, micro_model, tmp_path, monkeypatch, capsys):
    """`squeezeflow.cli.main(argv)` exits 2 with one line naming the problem, leaves the store empty and
    starts no server, for every member of every class."""
    from sf_testing import reset_boto3_session
    from squeezeflow import cli

    args, expected = MATRIX[case]
    store, services = tmp_path / "store", tmp_path / "services"
    monkeypatch.setenv("SQUEEZEFLOW_STORE", str(store))
    monkeypatch.setenv("SQUEEZEFLOW_SERVICES", str(services))
    monkeypatch.setenv("SQUEEZEFLOW_S3_ENDPOINT", "http://127.0.0.1:9")
    if case.startswith("credentials: embedded"):
        for var in ("SQUEEZEFLOW_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "SQUEEZEFLOW_REGISTRY"):
            monkeypatch.delenv(var, raising=False)
        services = _credentials(case.rsplit("file ", 1)[1], services)
    if case == "credentials: AWS config file corrupt":
        (tmp_path / "aws-config").write_text("[default\nregion = x\n")
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    reset_boto3_session()
    argv = [a.format(micro=micro_model, loop=make_loop_dir(tmp_path / "loop") if "{loop}" in a else "",
                     ck=_Lazy(lambda kind, dest: make_bad_checkpoint(kind, micro_model, dest), tmp_path / "ck"),
                     rec=_Lazy(_write_recipe, tmp_path / "rec"), cal=_Lazy(_calib_dir, tmp_path / "cal"))
            for a in args]
    started = time.perf_counter()
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    finally:
        reset_boto3_session()
    elapsed = time.perf_counter() - started
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    problems = []
    if rc != 2:
        problems.append(f"exit {rc}")
    if not (len(lines) == 1 and lines[0].startswith("squeezeflow: error:") and expected in lines[0]):
        problems.append(f"stderr {err[-2000:]!r}")
    if elapsed >= 60:
        problems.append(f"took {elapsed:.0f} s")
    if store.exists() and any(store.rglob("*")):
        problems.append("left files in the store")
    if any(services.rglob("state.json")) if services.exists() else False:
        problems.append("started an embedded server")
    tally("bad inputs rejected cleanly", not problems)
    assert problems == [], case


def test_clean_checkpoints_pass(micro_model, tiny_model, smollm_path):
    """The checks refuse the broken, not the sound: the micro and tiny models and SmolLM2 pass, and
    SmolLM2's second check, with its clean weights remembered, costs a stat per file, not a scan."""
    from squeezeflow.checkpoint_check import validate_checkpoint

    for path in (micro_model, tiny_model, smollm_path):
        validate_checkpoint(path)
    started = time.perf_counter()
    validate_checkpoint(smollm_path)
    assert time.perf_counter() - started < 10
