"""Squeezeflow: reproducible, resumable LLM compression.

Importing the package registers the `squeezeflow` quantizer with transformers, so that
`AutoModelForCausalLM.from_pretrained(artifact_dir)` loads packed artifacts.
"""
__version__ = "0.1.0"

try:  # transformers is a hard dependency; the guard keeps `import squeezeflow.errors` cheap in tools
    from . import hf_integration as _hf_integration  # noqa: F401
except ImportError as _e:  # pragma: no cover - only when the integration module itself is missing
    if "hf_integration" not in str(_e):
        raise


def load(ref: str, dtype=None):
    """Load a packed artifact from the registry (s3:// URI or `model/recipe@alias`) or a local directory,
    verifying every file's sha256 first. Returns a transformers model."""
    import torch

    from .models import load as _load

    return _load(ref, dtype or torch.float32)
