"""Lint: the code that runs on the compute device never creates a tensor without naming where. A torch factory
call (zeros, ones, empty, full, arange, eye, rand*, randperm, linspace, tensor) without `device=` makes a host
tensor, which on a GPU run is either a silent host<->device copy every step or a device-mismatch error that no
CPU test can see. The scope grows as modules move to the device; every method is in it (squeezeflow/methods/,
k-means included). A seeded draw from a host torch.Generator names device="cpu" (a CPU generator cannot draw on
a device, and drawing on the host keeps the stream identical on every device) and is then moved."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "squeezeflow"
ON_DEVICE = sorted([*(ROOT / "stages").glob("*.py"), *(ROOT / "stats").glob("*.py"), ROOT / "models.py",
                    ROOT / "evaluation" / "streamed.py", ROOT / "evaluation" / "kl.py",
                    ROOT / "evaluation" / "perplexity.py", *(ROOT / "methods").rglob("*.py")])
FACTORIES = {"zeros", "ones", "empty", "full", "arange", "eye", "rand", "randn", "randint", "randperm",
             "linspace", "tensor"}


def deviceless(text: str) -> list[str]:
    return [f"{n.lineno}: torch.{n.func.attr}" for n in ast.walk(ast.parse(text))
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in FACTORIES
            and isinstance(n.func.value, ast.Name) and n.func.value.id == "torch"
            and not any(k.arg == "device" for k in n.keywords)]


@pytest.mark.parametrize("path", ON_DEVICE, ids=lambda p: str(p.relative_to(ROOT)))
def test_factories_name_their_device(path):
    assert deviceless(path.read_text()) == []


def test_the_lint_sees_a_deviceless_call():
    text = "import torch\nx = torch.zeros(3, dtype=torch.float64)\ny = torch.ones(2, device='cpu')\nz = x.new_zeros(2)\n"
    assert deviceless(text) == ["2: torch.zeros"]
