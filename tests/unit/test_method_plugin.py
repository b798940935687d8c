"""A third-party weight method in one file outside the package, found through the `squeezeflow.methods`
entry point: it runs through `squeezeflow compress` (a real subprocess with its own store and embedded
Prefect server) and through the plain pipeline, and its packed layers compute what its `dequantize` says.
Nothing in squeezeflow is edited for it."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from squeezeflow import pipeline
from squeezeflow.config import CalibrationSpec, EvalSpec, ModelRef
from squeezeflow.models import load_model
from squeezeflow.store import LocalStore
from sf_testing import run_stages

# Sign-magnitude 1-bit weights (one fp16 magnitude per group: the mean |w|), stored in the existing 2-bit
# "intq" format as codes 1 / 3 around zero-point 2, so the stock loader and kernels run it.
PLUGIN = textwrap.dedent('''
    """signq: every weight becomes ±s, s the mean |w| of its group of `group_size` inputs."""
    import re
    from typing import Literal

    import torch
    from pydantic import Field

    from squeezeflow.config import Spec
    from squeezeflow.methods import CompressedLinear, WeightMethod, check_group_size, register


    class SignQConfig(Spec):
        method: Literal["signq"] = "signq"
        group_size: int = Field(32, ge=1)


    def parse_preset(name):
        m = re.fullmatch(r"signq-g(\\d+)", name)
        return [SignQConfig(group_size=int(m.group(1)))] if m else None


    @register(SignQConfig, presets=parse_preset, examples=("signq-g32",))
    class SignQ(WeightMethod):
        def check(self, linear_shapes):
            check_group_size(self.config.group_size, linear_shapes)

        def compress_linear(self, name, weight, stats):
            g = self.config.group_size
            out_f, in_f = weight.shape
            groups = weight.float().reshape(out_f, in_f // g, g)
            scales = groups.abs().mean(-1).half().clamp(min=torch.finfo(torch.float16).tiny)
            codes = torch.where(groups >= 0, 3, 1).to(torch.uint8).reshape(out_f, in_f)
            zeros = torch.full_like(scales, 2.0)
            return CompressedLinear("intq", {"bits": 2, "group_size": g},
                                    {"codes": codes, "scales": scales, "zeros": zeros})

        def dequantize(self, c):
            t, g = c.tensors, c.params["group_size"]
            signs = t["codes"].float() - t["zeros"].float().repeat_interleave(g, dim=1)
            return signs * t["scales"].float().repeat_interleave(g, dim=1)
''')


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    """sf_demo_plugin.py plus the dist-info an installed package would have, announcing the entry point."""
    d = tmp_path_factory.mktemp("plugin")
    (d / "sf_demo_plugin.py").write_text(PLUGIN)
    info = d / "sf_demo_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sf-demo-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[squeezeflow.methods]\nsignq = sf_demo_plugin\n")
    return d


def test_plugin_runs_through_the_cli(plugin_dir, tiny_model, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # its own embedded Prefect server
    env.update({"PYTHONPATH": os.pathsep.join(filter(None, [str(plugin_dir), env.get("PYTHONPATH")])),
                "SQUEEZEFLOW_STORE": str(tmp_path / "store"), "SQUEEZEFLOW_SERVICES": str(tmp_path / "services")})

    def cli(*args, timeout=900):
        return subprocess.run([sys.executable, "-m", "squeezeflow.cli", *args], capture_output=True, text=True,
                              env=env, timeout=timeout)

    try:
        p = cli("compress", str(tiny_model), "--recipe", "signq-g32", "--no-publish", "--calib-samples", "4",
                "--seqlen", "32", "--eval-windows", "2")
    finally:
        cli("services", "stop", timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "signq-g32: (not published)" in p.stdout.splitlines(), p.stdout
    # Without the plugin on the path the same preset is an unknown recipe, refused in one line.
    env["PYTHONPATH"] = env["PYTHONPATH"].split(os.pathsep, 1)[1] if os.pathsep in env["PYTHONPATH"] else ""
    p = cli("compress", str(tiny_model), "--recipe", "signq-g32", "--no-publish", timeout=120)
    assert p.returncode == 2 and "unknown recipe 'signq-g32'" in p.stderr, p.stderr[-2000:]


def test_plugin_packs_what_its_dequantize_says(plugin_dir, tiny_model, tmp_path, monkeypatch):
    from squeezeflow.methods import registry

    monkeypatch.syspath_prepend(str(plugin_dir))
    monkeypatch.setattr(registry, "_plugins_loaded", False)  # discover the entry point on the new path
    reg = registry.registrations()["signq"]
    method = reg.method(reg.config(group_size=32))

    plan = pipeline.preflight(ModelRef(ref=str(tiny_model)), "signq-g32", CalibrationSpec(n_samples=4, seqlen=32),
                              EvalSpec(seqlen=32, max_windows=2))
    assert plan.recipe.model_dump(mode="json")["methods"] == [{"method": "signq", "group_size": 32}]
    store = LocalStore(tmp_path / "store")
    out = run_stages(store, plan, base=False)
    packed = load_model(store.materialize(out["packed"]))
    dense = load_model(tiny_model)
    checked = 0
    x = torch.randn(3, dense.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for name, lin in dense.named_modules():
        if isinstance(lin, torch.nn.Linear) and ".layers." in name:
            expected = method.dequantize(method.compress_linear(name, lin.weight.detach(), {}))
            layer = packed.get_submodule(name)
            assert type(layer).__name__ == "QuantLinear" and layer.bits == 2
            assert torch.equal(layer.dequantize().float(), expected), name
            if layer.in_features == x.shape[1]:
                torch.testing.assert_close(layer(x), x @ expected.T, rtol=1e-4, atol=1e-5)
            checked += 1
    assert checked == 7 * dense.config.num_hidden_layers


def test_a_broken_plugin_is_one_line_exit_2(tiny_model, tmp_path):
    """A plugin whose module fails to import is named in one line before any server or heavy work."""
    (tmp_path / "sf_broken_plugin.py").write_text("raise ImportError('needs a library that is not installed')\n")
    info = tmp_path / "sf_broken_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sf-broken-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[squeezeflow.methods]\nbroken = sf_broken_plugin\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])),
               SQUEEZEFLOW_STORE=str(tmp_path / "store"), SQUEEZEFLOW_SERVICES=str(tmp_path / "services"))
    p = subprocess.run([sys.executable, "-m", "squeezeflow.cli", "compress", str(tiny_model), "--recipe", "rtn-w4g32",
                        "--no-publish"], capture_output=True, text=True, env=env, timeout=120)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr[-2000:]
    assert "method plugin 'broken' (sf_broken_plugin) failed to load: ImportError: needs a library" in lines[0]
    assert not (tmp_path / "services").exists() and not (tmp_path / "store").exists()
