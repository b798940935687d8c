"""Secrets never leak: a real compress run (CLI -> Prefect server -> SeaweedFS registry) with S3
credentials and a Prefect API key in its environment, then every byte the run wrote is searched for them:
its stdout/stderr, the artifact store, every registry object, the Prefect server's home (database,
results, logs) and the embedded servers' logs."""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from prefect_fixtures import prefect_server, shared_inputs, tiny_llama, worker_env  # noqa: F401  (fixtures by name)
from squeezeflow import s3
from sf_testing import tally

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]


def _files(root: Path):
    return (p for p in sorted(root.rglob("*")) if p.is_file())


def test_no_credential_appears_in_anything_a_run_writes(prefect_server, s3_server, tiny_llama, tmp_path):
    needles = {"AWS secret access key": os.environ["AWS_SECRET_ACCESS_KEY"],
               "Prefect API key": "pnu_" + secrets.token_hex(18)}
    registry = f"s3://{s3_server['bucket']}/secrets-{uuid.uuid4().hex[:8]}"
    store = tmp_path / "store"
    env = worker_env(PREFECT_API_KEY=needles["Prefect API key"], SQUEEZEFLOW_STORE=str(store))
    p = subprocess.run([sys.executable, "-m", "squeezeflow.cli", "--json", "compress", str(tiny_llama),
                        "--recipe", "rtn-w4g32", "--calib-samples", "4", "--seqlen", "64", "--eval-windows", "2",
                        "--registry", registry], capture_output=True, env=env, cwd=tmp_path, timeout=360)
    assert p.returncode == 0, p.stderr.decode(errors="replace")[-4000:]
    result = json.loads(p.stdout)["results"]
    assert result[-1]["uri"].startswith(registry)  # it really published

    places: dict[str, bytes] = {"stdout": p.stdout, "stderr": p.stderr}
    for f in _files(store):
        places[f"store:{f.relative_to(store)}"] = f.read_bytes()
    loc = s3.S3Location.parse(registry)
    c = s3.client()
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=loc.prefix + "/"):
        for obj in page.get("Contents", []):
            places[f"registry:{obj['Key']}"] = c.get_object(Bucket=loc.bucket, Key=obj["Key"])["Body"].read()
    home = prefect_server["home"]
    for f in _files(home):  # the server's SQLite database (runs, parameters, logs, artifacts) included
        places[f"prefect-home:{f.relative_to(home)}"] = f.read_bytes()
    for f in _files(Path(os.environ["SQUEEZEFLOW_SERVICES"])):
        if f.suffix == ".log":
            places[f"services:{f.name}"] = f.read_bytes()
    assert any(k.startswith("registry:") and k.endswith("manifest.json") for k in places)
    assert any(k.startswith("prefect-home:") for k in places)

    leaks = [f"{what} in {where}" for where, data in places.items() for what, needle in needles.items()
             if needle.encode() in data]
    for where in places:
        tally("places scanned for secrets, clean", not any(where in leak for leak in leaks))
    assert leaks == []
