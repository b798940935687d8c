"""Where Squeezeflow keeps things. Every location is overridable through the environment.

Caches live outside the repository (default ~/.cache/squeezeflow) so that a fresh clone, CI and later
sessions reuse the prepared model, corpora and the artifact store; a machine without them rebuilds them.
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    return Path(os.environ.get("SQUEEZEFLOW_CACHE", Path.home() / ".cache" / "squeezeflow")).expanduser()


def models_dir() -> Path:
    return Path(os.environ.get("SQUEEZEFLOW_MODELS", cache_home() / "models")).expanduser()


def corpora_dir() -> Path:
    return Path(os.environ.get("SQUEEZEFLOW_CORPORA", cache_home() / "corpora")).expanduser()


def services_dir() -> Path:
    """State of the embedded servers (Prefect home + SQLite, SeaweedFS data, pid files)."""
    return Path(os.environ.get("SQUEEZEFLOW_SERVICES", cache_home() / "services")).expanduser()


def store_uri() -> str:
    """The content-addressed artifact store: a local directory or s3://bucket/prefix."""
    return os.environ.get("SQUEEZEFLOW_STORE", str(cache_home() / "store"))


def registry_uri() -> str | None:
    """The S3 registry (s3://bucket/prefix). None means: use the embedded SeaweedFS server."""
    return os.environ.get("SQUEEZEFLOW_REGISTRY") or None


def scratch_dir() -> Path:
    """Local copies of remote objects and materialized artifact directories."""
    return Path(os.environ.get("SQUEEZEFLOW_SCRATCH", cache_home() / "scratch")).expanduser()
