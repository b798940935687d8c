"""Suite-wide set-up: shared read-only caches, isolated writable state, and model fixtures.

The prepared model and corpora are reused from the normal cache (built on first use on a fresh
machine); the artifact store, scratch space and services of a test session live in a temp dir, so tests
never touch a user's store or registry.
"""
from __future__ import annotations

import atexit
import os

# Triton picks interpreter or compiler when a kernel is decorated, i.e. when the first module that defines
# one is imported, which can be any test's import: choose for the whole session, before anything else.
os.environ.setdefault("TRITON_INTERPRET", "1")
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from squeezeflow import settings
from sf_testing import COUNTS, make_tiny_llama

os.environ.setdefault("SQUEEZEFLOW_MODELS", str(settings.models_dir()))
os.environ.setdefault("SQUEEZEFLOW_CORPORA", str(settings.corpora_dir()))
_SESSION_TMP = Path(tempfile.mkdtemp(prefix="squeezeflow-tests-"))
# A full run leaves ~4 GB of stores and scratch trees here; left behind, a few runs fill a disk.
atexit.register(shutil.rmtree, _SESSION_TMP, ignore_errors=True)
os.environ["SQUEEZEFLOW_STORE"] = str(_SESSION_TMP / "store")
os.environ["SQUEEZEFLOW_SCRATCH"] = str(_SESSION_TMP / "scratch")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    """The real SmolLM2-135M, prepared (GGUF -> fp32 safetensors) once per machine."""
    from squeezeflow.models import prepare_model

    return prepare_model("smollm2-135m").path

@pytest.fixture(scope="session")
def tiny_model(smollm_path: Path, tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama", smollm_path)


@pytest.fixture(scope="session")
def smollm_truncated(smollm_path: Path, tmp_path_factory) -> Path:
    """SmolLM2 cut to its first 3 decoder blocks: real weights, quick to run."""
    from squeezeflow.models import truncate_model

    return truncate_model(smollm_path, tmp_path_factory.mktemp("smol") / "smollm2-3l", 3).path


@pytest.fixture
def moto_server(monkeypatch):
    """A real S3 API (moto's threaded server on a free loopback port) as the configured endpoint; yields
    a client. Tests create the buckets they use."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    monkeypatch.setenv("SQUEEZEFLOW_S3_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    try:
        from squeezeflow.s3 import client

        yield client()
    finally:
        server.stop()


def pytest_terminal_summary(terminalreporter):
    """The hardening tests' counts, e.g. "bad inputs: 40/40 rejected cleanly", shown even with -q."""
    for label, (passed, total) in sorted(COUNTS.items()):
        terminalreporter.write_line(f"{label}: {passed}/{total}")
