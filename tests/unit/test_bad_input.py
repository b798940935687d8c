"""Bad input fails fast: exit status 2, one clear line on stderr, before any heavy work or server start,
and nothing is written to the artifact store."""
import os
import subprocess
import sys
import time

import pytest


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
    "missing model path": (["compress", "/nonexistent/model", "--recipe", "rtn-w4g64"], "does not exist"),
    "bits 1": (["compress", "{tiny}", "--recipe", "rtn-w1g32"], "bits must be between 2 and 8, got 1"),
    "bits 9": (["compress", "{tiny}", "--recipe", "rtn-w9g32"], "bits must be between 2 and 8, got 9"),
    "group does not divide": (["compress", "{tiny}", "--recipe", "rtn-w4g48"], "group size 48 does not divide"),
    "empty calibration corpus": (["compress", "{tiny}", "--recipe", "rtn-w4g32", "--calibration", "{empty}"], "empty"),
    "seqlen above max": (["compress", "{tiny}", "--recipe", "rtn-w4g32", "--seqlen", "4096"], "exceeds the model's maximum of 512"),
    "unknown recipe": (["compress", "{tiny}", "--recipe", "awq-w4g32"], "unknown recipe"),
    "negative samples": (["compress", "{tiny}", "--recipe", "rtn-w4g32", "--calib-samples", "0"], "n_samples"),
    "N:M that does not divide": (["compress", "{tiny}", "--recipe", "nowag-p5:7"], "divisible by 7"),
    "sparsity 100%": (["compress", "{tiny}", "--recipe", "wanda-p100"], "unknown recipe"),
    "VQ codebook too large": (["compress", "{tiny}", "--recipe", "nowag-vq3d8"], "too large"),
    "model name the registry cannot hold": (["compress", "{spaced}", "--recipe", "rtn-w4g32"], "invalid model 'tiny llama'"),
    "unreachable S3": (["compress", "{tiny}", "--recipe", "rtn-w4g32", "--registry", "s3://nowhere/reg"], "unreachable"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2(case, tiny_model, tmp_path):
    args, expected = CASES[case]
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    spaced = tmp_path / "tiny llama"
    if "{spaced}" in args:
        spaced.symlink_to(tiny_model, target_is_directory=True)
    args = [a.format(tiny=tiny_model, empty=empty, spaced=spaced) for a in args]
    # Port 9 on loopback (discard) has no S3 server: connection refused straight away.
    p, elapsed, store = run_cli(args, {"SQUEEZEFLOW_S3_ENDPOINT": "http://127.0.0.1:9"}, tmp_path)
    assert p.returncode == 2, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("squeezeflow: error:"), p.stderr
    assert expected in lines[0]
    assert elapsed < 60
    assert not store.exists() or not any(store.rglob("*")), "bad input left files in the store"
    assert not (tmp_path / "services").exists(), "bad input started an embedded server"
