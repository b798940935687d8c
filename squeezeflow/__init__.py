"""Squeezeflow: reproducible, resumable LLM compression.

Importing the package registers the `squeezeflow` quantizer with transformers (when transformers is
imported, before or after), so that `AutoModelForCausalLM.from_pretrained(artifact_dir)` loads packed
artifacts.
"""
__version__ = "0.1.0"

import sys as _sys


def _register_with_transformers() -> None:
    try:  # transformers is a hard dependency; the guard keeps tools working without the module
        from . import hf_integration  # noqa: F401
    except ImportError as e:  # pragma: no cover - only when the integration module itself is missing
        if "hf_integration" not in str(e):
            raise


class _AfterTransformersImport:
    """Registers the quantizer the moment transformers finishes importing, not here: importing
    transformers and torch takes seconds, and `squeezeflow --help` (or `import squeezeflow.errors`) needs
    neither. A meta-path finder that wraps transformers' own loader, so its module runs unchanged."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        import importlib.util

        _sys.meta_path.remove(self)  # one shot: find the real spec, then step aside
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader:
    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, attr):  # get_source, is_package, resource readers...: the real loader's
        return getattr(self._inner, attr)

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        _register_with_transformers()


if "transformers" in _sys.modules:
    _register_with_transformers()
elif not any(isinstance(f, _AfterTransformersImport) for f in _sys.meta_path):
    _sys.meta_path.insert(0, _AfterTransformersImport())


def load(ref: str, dtype=None, *, tokenizer: bool = False, require_signature: bool | None = None):
    """Load an artifact in one line: ``squeezeflow.load("s3://…" | "model/recipe@alias" | dir)``.

    A registry entry is downloaded once into the local cache (scratch_dir()/pulled), authenticated (its
    manifest names the entry and matches its content id, every file matches its sha256) and checked
    against the signature policy (`require_signature`, else SQUEEZEFLOW_REQUIRE_SIGNATURE, with keys from
    SQUEEZEFLOW_TRUSTED_KEYS; see squeezeflow.signing); the cached copy is re-verified on each later load.
    A local artifact directory with a manifest.json is verified the same way (its signature only with
    ``require_signature=True``: a directory you built yourself is not signed); a directory without one,
    e.g. a plain checkpoint, loads as is. Returns the transformers model, or ``(model, tokenizer)`` with
    ``tokenizer=True``."""
    from pathlib import Path

    import torch

    from .errors import BadInput
    from .models import load_model, load_tokenizer, pull_artifact
    from .registry import verify_dir
    from .signing import TrustPolicy

    path = Path(ref).expanduser()
    if path.is_dir():
        if (path / "manifest.json").exists():
            verify_dir(path, trust=TrustPolicy.from_env(True) if require_signature else None)
    elif ref.startswith("s3://") or "@" in ref:
        path = pull_artifact(ref, require_signature)  # authenticated download, or a re-verified cached copy
    else:
        from .terminal import safe_text

        raise BadInput(f"cannot load {safe_text(repr(ref))}: not a directory, an s3:// URI or a "
                       "model/recipe@alias reference")
    model = load_model(path, dtype or torch.float32)
    return (model, load_tokenizer(path)) if tokenizer else model
