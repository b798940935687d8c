"""S3 credentials and the shared store from prefect-aws blocks (squeezeflow/aws_blocks.py), end to end:
real AwsCredentials / S3Bucket blocks saved to a real Prefect server, a real SeaweedFS that enforces
credentials, and the CLI in a child process whose environment holds no S3 credentials or endpoint at all,
so the only way it can reach the bucket is through the blocks it names.

The file is named to run after test_services.py: saving a block makes Prefect record its non-secret fields
(here the embedded server's own access key id) in the session server's events, which the services'
credential scan (test_credentials_never_leak) is right to flag for anything Squeezeflow itself writes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from prefect_fixtures import prefect_server, shared_inputs, tiny_llama, worker_env  # noqa: F401  (fixtures by name)
from squeezeflow import s3
from sf_testing import EnvSnapshot

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

_S3_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "SQUEEZEFLOW_S3_ENDPOINT",
            "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "SQUEEZEFLOW_S3_BLOCK", "SQUEEZEFLOW_REGISTRY")


@pytest.fixture(scope="module")
def blocks(prefect_server, s3_server) -> dict:
    """A good and a wrong-secret AwsCredentials block for the embedded SeaweedFS, and an S3Bucket block for a
    fresh store folder in its bucket, saved on the session's Prefect server."""
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    tag = uuid.uuid4().hex[:8]
    params = AwsClientParameters(endpoint_url=s3_server["endpoint"])
    good = AwsCredentials(aws_access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1",
                          aws_client_parameters=params)
    wrong_secret = "wrong-" + uuid.uuid4().hex
    bad = AwsCredentials(aws_access_key_id=os.environ["AWS_ACCESS_KEY_ID"], aws_secret_access_key=wrong_secret,
                         region_name="us-east-1", aws_client_parameters=params)
    names = {"good": f"sf-good-{tag}", "bad": f"sf-bad-{tag}", "store": f"sf-store-{tag}"}
    good.save(names["good"])
    bad.save(names["bad"])
    folder = f"blocks-store-{tag}"
    S3Bucket(bucket_name=s3_server["bucket"], bucket_folder=folder, credentials=good).save(names["store"])
    return {**names, "folder": folder, "bucket": s3_server["bucket"],
            "secrets": [os.environ["AWS_SECRET_ACCESS_KEY"], wrong_secret]}


def _env(**extra: str) -> dict[str, str]:
    """The test's environment (Prefect API, caches) with every S3 credential and endpoint removed."""
    env = {k: v for k, v in worker_env(**extra).items() if k not in _S3_VARS}
    env["AWS_SHARED_CREDENTIALS_FILE"] = env["AWS_CONFIG_FILE"] = os.devnull  # no profile to fall back on
    return env


def _cli(*args: str, cwd: Path, timeout: float = 500) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "squeezeflow.cli", *args], capture_output=True, text=True,
                          env=_env(), cwd=cwd, timeout=timeout)


def _keys(bucket: str, prefix: str) -> list[str]:
    c = s3.client()  # this process still has the embedded server's credentials
    return [o["Key"] for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
            for o in page.get("Contents", [])]


def _no_secret(blocks: dict, *texts: str) -> None:
    for secret in blocks["secrets"]:
        assert all(secret not in t for t in texts), "a secret from a block was printed"


def test_compress_and_pull_reach_the_bucket_through_blocks(blocks, tiny_llama, tmp_path):
    registry = f"s3://{blocks['bucket']}/blocks-registry-{uuid.uuid4().hex[:8]}"
    p = _cli("--json", "compress", str(tiny_llama), "--recipe", "rtn-w4g32", "--calib-samples", "4",
             "--seqlen", "64", "--eval-windows", "2", "--no-progress", "--registry", registry,
             "--aws-credentials-block", blocks["good"], "--store-block", blocks["store"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    uri = json.loads(p.stdout)["results"][-1]["uri"]
    assert uri.startswith(registry + "/")
    # The stage cache went to the S3Bucket block's folder, the entry to the registry: both in the bucket.
    store_keys = _keys(blocks["bucket"], blocks["folder"])
    assert len(store_keys) >= 3, store_keys
    assert any(k.endswith("manifest.json") for k in _keys(blocks["bucket"], s3.S3Location.parse(registry).prefix))
    _no_secret(blocks, p.stdout, p.stderr)

    # The flow run's parameters (what the UI shows) name the blocks and hold no secret.
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        run = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["compress"])),
                                    sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
    dest = run.parameters["destinations"]
    assert (dest["aws_credentials_block"], dest["store_block"]) == (blocks["good"], blocks["store"])
    assert dest["store"] == f"s3://{blocks['bucket']}/{blocks['folder']}"
    _no_secret(blocks, json.dumps(run.parameters, default=str))

    # Pull with the block works; the same pull without it has no credentials and is refused in one line.
    pulled = _cli("--json", "registry", "pull", uri, "--dest", str(tmp_path / "pulled"), "--registry", registry,
                  "--aws-credentials-block", blocks["good"], cwd=tmp_path)
    assert pulled.returncode == 0, pulled.stderr[-2000:]
    assert (Path(json.loads(pulled.stdout)["path"]) / "manifest.json").is_file()
    bare = _cli("registry", "pull", uri, "--dest", str(tmp_path / "bare"), "--registry", registry, cwd=tmp_path)
    assert bare.returncode == 2 and len(bare.stderr.strip().splitlines()) == 1, bare.stderr


def test_a_wrong_secret_in_the_block_is_refused_by_the_server(blocks, tmp_path):
    registry = f"s3://{blocks['bucket']}/blocks-registry-denied"
    p = _cli("registry", "list", "--registry", registry, "--aws-credentials-block", blocks["bad"], cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "denied" in lines[0] and blocks["bad"] in lines[0], repr(p.stderr)
    _no_secret(blocks, p.stdout, p.stderr)
    # The good block on the same command succeeds: the refusal was the secret, not the command.
    ok = _cli("--json", "registry", "list", "--registry", registry, "--aws-credentials-block", blocks["good"],
              cwd=tmp_path)
    assert ok.returncode == 0 and json.loads(ok.stdout) == {"artifacts": []}, ok.stderr


@pytest.mark.parametrize("flags, message", [
    (["--aws-credentials-block", "no-such-block"], "no AwsCredentials block named 'no-such-block'"),
    (["--store-block", "no-such-bucket"], "no S3Bucket block named 'no-such-bucket'"),
    (["--store-block", "x", "--store", "STORE"], "not both"),
])
def test_a_missing_block_is_one_line_before_any_work(blocks, tiny_llama, tmp_path, flags, message):
    flags = [str(tmp_path / "x") if f == "STORE" else f for f in flags]
    p = _cli("compress", str(tiny_llama), "--recipe", "rtn-w4g32", "--calib-samples", "4", "--seqlen", "64",
             *flags, cwd=tmp_path, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and message in p.stderr, p.stderr
    assert not (tmp_path / "x").exists()


def test_the_flow_form_has_the_block_fields():
    from prefect.utilities.callables import parameter_schema

    from squeezeflow.flows.compress import compress_flow
    from squeezeflow.flows.sweep import sweep_flow

    for f in (compress_flow, sweep_flow):
        dest = parameter_schema(f).model_dump()["definitions"]["Destinations"]["properties"]
        assert {"aws_credentials_block", "store_block"} <= set(dest)
        assert "AwsCredentials" in dest["aws_credentials_block"]["description"]


def test_a_flow_run_given_only_block_names_loads_them_itself(blocks, tiny_llama, tmp_path):
    """What a deployment run from the UI form gets: parameters with block names, a process with no S3
    credentials (the flow runs in a fresh interpreter, as under a worker)."""
    from prefect_fixtures import _RUN_FLOW

    registry = f"s3://{blocks['bucket']}/blocks-flow-{uuid.uuid4().hex[:8]}"
    params = {"model": {"ref": str(tiny_llama)}, "recipe": "rtn-w4g32",
              "calibration": {"n_samples": 4, "seqlen": 64}, "evaluation": {"seqlen": 64, "max_windows": 2},
              "destinations": {"registry": registry, "aws_credentials_block": blocks["good"],
                               "store_block": blocks["store"]}}
    result = tmp_path / "result.json"
    p = subprocess.run([sys.executable, "-c", _RUN_FLOW, json.dumps(params), str(result),
                        "squeezeflow.flows.compress:compress_flow"], capture_output=True, text=True, env=_env(),
                       cwd=tmp_path, timeout=500)
    out = json.loads(result.read_text()) if result.is_file() else {}
    assert p.returncode == 0 and out.get("completed"), (p.stdout + p.stderr)[-4000:]
    assert out["result"]["artifact"]["uri"].startswith(registry + "/")
    _no_secret(blocks, p.stdout, p.stderr)


def test_a_worker_environment_names_the_shared_store_for_runs_that_name_none(blocks):
    from squeezeflow.flows.compress import Destinations

    snapshot = EnvSnapshot()
    try:
        os.environ["SQUEEZEFLOW_STORE_BLOCK"] = blocks["store"]
        assert Destinations().apply_blocks() == f"s3://{blocks['bucket']}/{blocks['folder']}"
        assert Destinations(store="/tmp/explicit").apply_blocks() == "/tmp/explicit"  # a run's own store wins
    finally:
        snapshot.restore()


# --- how a block's fields become this process's S3 settings (real prefect-aws objects, no server) ----

@pytest.fixture
def clean_s3_env():
    """No S3 settings but a stale session token; the whole environment is put back afterwards (the blocks
    write variables monkeypatch would not know to remove)."""
    snapshot = EnvSnapshot()
    for var in (*_S3_VARS, "AWS_PROFILE", "AWS_REGION"):
        os.environ.pop(var, None)
    os.environ["AWS_SESSION_TOKEN"] = "left-from-other-credentials"
    try:
        yield os.environ
    finally:
        snapshot.restore()


def test_keys_endpoint_and_region_are_exported_and_a_stale_token_dropped(clean_s3_env):
    from prefect_aws import AwsCredentials
    from prefect_aws.client_parameters import AwsClientParameters

    from squeezeflow import aws_blocks

    aws_blocks._export(AwsCredentials(aws_access_key_id="AK", aws_secret_access_key="SK", region_name="eu-west-3",
                                      aws_client_parameters=AwsClientParameters(endpoint_url="http://127.0.0.1:1")),
                       "AwsCredentials block 'x'")
    env = clean_s3_env
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], env["AWS_REGION"]) == ("AK", "SK", "eu-west-3")
    assert env["SQUEEZEFLOW_S3_ENDPOINT"] == "http://127.0.0.1:1" and "AWS_SESSION_TOKEN" not in env
    assert s3.credentials_hint() == "AwsCredentials block 'x'" and s3.endpoint_url() == "http://127.0.0.1:1"


def test_minio_profile_and_empty_credentials(clean_s3_env):
    from prefect_aws import AwsCredentials, MinIOCredentials

    from squeezeflow import aws_blocks

    env = clean_s3_env
    aws_blocks._export(MinIOCredentials(minio_root_user="mu", minio_root_password="mp"), "b")
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == ("mu", "mp")
    aws_blocks._export(AwsCredentials(profile_name="team"), "b")  # env keys would win over the profile
    assert env["AWS_PROFILE"] == "team" and "AWS_ACCESS_KEY_ID" not in env
    del env[aws_blocks.MARKER]
    env["SQUEEZEFLOW_S3_ENDPOINT"] = "http://mine:9000"
    aws_blocks._export(AwsCredentials(), "S3Bucket block 's'")  # nothing in it: the environment stays in force
    assert env["SQUEEZEFLOW_S3_ENDPOINT"] == "http://mine:9000" and aws_blocks.MARKER not in env
    with pytest.raises(aws_blocks.BadInput, match="without a secret"):
        aws_blocks._export(AwsCredentials(aws_access_key_id="AK"), "AwsCredentials block 'half'")
    with pytest.raises(aws_blocks.BadInput, match="assume_role_arn"):
        aws_blocks._export(AwsCredentials(assume_role_arn="arn:aws:iam::1:role/r"), "AwsCredentials block 'r'")


def test_the_flags_default_to_the_environment(monkeypatch):
    from squeezeflow.cli import build_parser

    monkeypatch.setenv("SQUEEZEFLOW_AWS_CREDENTIALS_BLOCK", "from-env")
    monkeypatch.setenv("SQUEEZEFLOW_STORE_BLOCK", "store-env")
    args = build_parser().parse_args(["compress", "m", "--recipe", "rtn-w4g64"])
    assert (args.aws_credentials_block, args.store_block) == ("from-env", "store-env")
    args = build_parser().parse_args(["registry", "list", "--aws-credentials-block", "flag"])
    assert args.aws_credentials_block == "flag" and not hasattr(args, "store_block")
