"""The acceptance run as a new user types it: `squeezeflow compress MODEL --recipe … --eval my.txt` with a
text file the project has never seen, on the real Prefect server and embedded S3 registry. The table shows
the file's perplexity for the base model and the artifact, the run ends with the artifact's local path and
the next commands, and `squeezeflow eval` on the published URI re-measures the same number on that file."""
from __future__ import annotations

import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from prefect_fixtures import prefect_server, shared_inputs, tiny_llama, worker_env  # noqa: F401  (fixtures by name)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "squeezeflow.cli", *argv], capture_output=True, text=True,
                          cwd=cwd, env=worker_env(), timeout=600)


def test_compress_with_own_eval_file_then_eval_the_published_artifact(s3_server, prefect_server, tiny_llama, tmp_path):
    rng = random.Random(11)
    words = "amber falcon drifts over quiet rivers while northern bells ring for the evening market".split()
    (tmp_path / "my.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(14)) + "."
                                               for _ in range(60)))
    registry = f"s3://{s3_server['bucket']}/eval-sources"
    run = cli("compress", str(tiny_llama), "--recipe", "rtn-w4g32", "--eval", "my.txt", "--calib-samples", "4",
              "--seqlen", "32", "--eval-windows", "2", "--store", str(tmp_path / "store"), "--registry", registry,
              cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert lines[0].split()[:3] == ["recipe", "ppl", "my.txt"]
    base = next(line for line in lines if line.startswith("fp32 "))
    mine = next(line for line in lines if line.startswith("rtn-w4g32 "))
    base_ppl, ppl = float(base.split()[1]), float(mine.split()[1])
    assert base_ppl > 1 and ppl > 1
    uri = re.search(r"^rtn-w4g32: (s3://\S+)$", run.stdout, re.M).group(1)
    local = re.search(r"local copy: (\S+)", run.stdout).group(1)
    assert Path(local, "manifest.json").is_file()
    assert f"squeezeflow registry pull {uri} --dest ./rtn-w4g32" in run.stdout
    assert f"squeezeflow eval {uri}" in run.stdout

    again = cli("eval", uri, "--kl-windows", "0", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    measured, recorded = re.search(r"^my.txt: perplexity (\S+) \(recorded (\S+)\)$", again.stdout, re.M).groups()
    assert measured == recorded and abs(float(recorded) - ppl) < 0.001  # the table rounds to 3 decimals
