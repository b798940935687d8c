"""What code produced an artifact: package, stage versions, git commit and library versions."""
from __future__ import annotations

import functools
import platform
from pathlib import Path

from . import __version__
from .memo import STAGE_VERSIONS


def library_versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "squeezeflow": __version__}
    for lib in ("torch", "transformers", "safetensors", "prefect", "boto3"):
        try:
            out[lib] = md.version(lib)
        except md.PackageNotFoundError:
            out[lib] = None
    return out


def code_version() -> dict:
    """Package version, stage versions and, in a checkout, the git commit of the code that ran."""
    return {"squeezeflow": __version__, "stages": STAGE_VERSIONS, "git_commit": git_commit()}


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """HEAD of the checkout this code runs from, read from .git directly (no subprocess: under load a
    `git` call can time out, and a missing commit would make otherwise identical manifests differ)."""
    git = Path(__file__).resolve().parent.parent / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        if (git / ref).is_file():
            return (git / ref).read_text().strip()
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return None
