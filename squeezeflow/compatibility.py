"""The manifest's compatibility block: which packed formats an artifact holds and what can run it.

A consumer (or a deployment check) reads this instead of loading the model to find out whether the
artifact runs on its stack: the torch reference forward (any device), the Triton kernels (CUDA), or vLLM
through `squeezeflow export --format compressed-tensors`; and which library versions it was evaluated
with. Everything here is derived from the packed config.json and the installed versions, never from the
clock, so identical runs still give byte-identical manifests.
"""
from __future__ import annotations

import importlib.metadata as md
import json
from collections import Counter
from pathlib import Path
from typing import Any

from .kernels.formats import FORMATS

# What each format declares (kernels/packed_linear.py: triton_kernel, compressed_tensors); unit tests keep
# the declarations in step with the kernels' dispatch and with what export.py accepts.
TRITON_FORMATS = frozenset(name for name, cls in FORMATS.items() if cls.triton_kernel)
COMPRESSED_TENSORS_FORMATS = frozenset(name for name, cls in FORMATS.items() if cls.compressed_tensors)
TESTED_LIBRARIES = ("torch", "transformers", "safetensors", "prefect")


def tested_versions() -> dict[str, str | None]:
    out = {}
    for lib in TESTED_LIBRARIES:
        try:
            out[lib] = md.version(lib)
        except md.PackageNotFoundError:
            out[lib] = None
    return out


def compatibility(artifact_dir: str | Path) -> dict[str, Any]:
    """The block for a packed (or plain, e.g. layer-pruned) checkpoint directory."""
    config = json.loads((Path(artifact_dir) / "config.json").read_text())
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != "squeezeflow":  # layer removal only: an ordinary dense checkpoint
        return {"quant_method": None, "format_version": None, "formats": [], "tested_with": tested_versions(),
                "runtimes": {
                    "transformers": {"supported": True, "how": "AutoModelForCausalLM.from_pretrained (plain checkpoint)"},
                    "torch-reference": {"supported": True, "how": "plain nn.Linear layers"},
                    "triton": {"supported": False, "how": "no packed layers: nothing for the kernels to run"},
                    "vllm-compressed-tensors": {"supported": True, "how": "squeezeflow export (passed through)"}}}
    counts = Counter(entry["format"] for entry in qc.get("modules", {}).values())
    formats = [{"name": name, "modules": n,
                "kernels": ["torch"] + (["triton"] if name in TRITON_FORMATS else []),
                "compressed_tensors": name in COMPRESSED_TENSORS_FORMATS} for name, n in sorted(counts.items())]
    names = set(counts)
    no_triton = sorted(names - TRITON_FORMATS)
    no_ct = sorted(names - COMPRESSED_TENSORS_FORMATS)
    return {
        "quant_method": "squeezeflow", "format_version": qc.get("format_version"), "formats": formats,
        "tested_with": tested_versions(),
        "runtimes": {
            "transformers": {"supported": True, "how": "import squeezeflow; AutoModelForCausalLM.from_pretrained"},
            "torch-reference": {"supported": True, "how": "SQUEEZEFLOW_KERNELS=torch, any device"},
            "triton": {"supported": bool(names) and not no_triton,
                       "how": "CUDA with triton installed (SQUEEZEFLOW_KERNELS=auto)" if not no_triton
                       else f"no Triton kernel for {', '.join(no_triton)}: those layers run the torch reference"},
            "vllm-compressed-tensors": {"supported": not no_ct,
                                        "how": "squeezeflow export --format compressed-tensors" if not no_ct
                                        else f"{', '.join(no_ct)} has no compressed-tensors equivalent"},
        },
    }
