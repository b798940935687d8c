"""Shared fixtures for integration tests that need real servers.

One SeaweedFS S3 server per test session, started through `services.ensure_s3()` exactly as the CLI
does, with every cache and services location inside a pytest temp dir. The environment is restored and
the server stopped when the session ends.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from squeezeflow import services
from squeezeflow.registry import Registry
from sf_testing import EnvSnapshot, reset_boto3_session

# Anything that would point the embedded-server logic or boto3 somewhere else.
_FOREIGN_VARS = (*services.S3_ENDPOINT_VARS, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "SQUEEZEFLOW_REGISTRY")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A running embedded SeaweedFS; this process's environment points at it (endpoint + credentials)."""
    root = tmp_path_factory.mktemp("squeezeflow")
    snapshot = EnvSnapshot()
    for var in _FOREIGN_VARS:
        os.environ.pop(var, None)
    os.environ["SQUEEZEFLOW_CACHE"] = str(root / "cache")
    os.environ["SQUEEZEFLOW_SERVICES"] = str(root / "services")
    reset_boto3_session()
    try:
        info = services.ensure_s3()
        yield {**info, "services_dir": root / "services"}
    finally:
        try:
            services.stop()
        finally:
            snapshot.restore()


@pytest.fixture
def fresh_services(s3_server: dict, tmp_path: Path) -> Iterator[Path]:
    """A second, empty services dir for tests that start/stop their own servers; fully undone after."""
    snapshot = EnvSnapshot()
    path = tmp_path / "services"
    os.environ["SQUEEZEFLOW_SERVICES"] = str(path)
    try:
        yield path
    finally:
        try:
            services.stop()
        finally:
            snapshot.restore()


@pytest.fixture
def registry(s3_server: dict) -> Registry:
    """An empty registry: a fresh prefix in the embedded server's bucket."""
    return Registry(f"s3://{s3_server['bucket']}/test-{uuid.uuid4().hex[:10]}")
