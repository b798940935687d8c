"""The manifest's compatibility block: which packed formats an artifact holds and what can run it.

A consumer (or a deployment check) reads this instead of loading the model to find out whether the
artifact runs on its stack: the torch reference forward (any device), the Triton kernels (CUDA), or vLLM
through `squeezeflow export --format compressed-tensors`; and which library versions it was evaluated
with. What vLLM can serve is each format's own statement (`vllm` on the kernel format classes), refined
by the artifact's bit widths; it is marked "on paper, not run on a GPU" until a GPU run checks it. Everything here is derived from the packed config.json and the installed versions, never from the
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
VLLM_BASIS = "on paper, not run on a GPU"
VLLM_STATUSES = ("served", "served-dense", "not-served")
VLLM_WNA16_BITS = frozenset({4, 8})  # vLLM's compressed-tensors WNA16 scheme: 4- and 8-bit integer weights


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
                    "vllm-compressed-tensors": {"supported": True, "how": "squeezeflow export (passed through)"},
                    "vllm": {"supported": True, "basis": VLLM_BASIS, "how": "a plain dense checkpoint: vLLM serves it"}}}
    modules = qc.get("modules", {})
    counts = Counter(entry["format"] for entry in modules.values())
    formats = [{"name": name, "modules": n,
                "kernels": ["torch"] + (["triton"] if name in TRITON_FORMATS else []),
                "compressed_tensors": name in COMPRESSED_TENSORS_FORMATS,
                "vllm": vllm_statement(name, [e for e in modules.values() if e["format"] == name])}
               for name, n in sorted(counts.items())]
    names = set(counts)
    not_served = [f["name"] for f in formats if f["vllm"]["status"] == "not-served"]
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
            "vllm": {"supported": bool(names) and not not_served, "basis": VLLM_BASIS,
                     "how": "squeezeflow export --format compressed-tensors, then vLLM (see formats[].vllm)"
                     if not not_served else f"vLLM cannot serve {', '.join(not_served)}: see formats[].vllm"},
        },
    }


def vllm_statement(name: str, entries: list[dict] | None = None) -> dict[str, str]:
    """What vLLM can serve of format `name` ({"status", "how", "basis"}), from the format class's own
    declaration; for integer grids, layers of a width vLLM's WNA16 scheme does not take make it not-served."""
    status, how = FORMATS[name].vllm
    bits = sorted({int(e["bits"]) for e in entries or () if "bits" in e} - VLLM_WNA16_BITS)
    if status == "served" and bits:
        status, how = "not-served", (f"{'/'.join(map(str, bits))}-bit layers: vLLM's compressed-tensors WNA16 "
                                     "scheme takes 4 or 8 bits only")
    return {"status": status, "how": how, "basis": VLLM_BASIS}
