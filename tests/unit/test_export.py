"""`squeezeflow export --format compressed-tensors|hf`: exported RTN/GPTQ/pruned artifacts load with plain
transformers + compressed-tensors (a process that never imports squeezeflow, no extra arguments) and
decompress with compressed-tensors' own code to logits equal to ours; `hf` is a Hub-ready folder."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from squeezeflow import pipeline
from squeezeflow.cli import main
from squeezeflow.config import CalibrationSpec, EvalSpec, ModelRef
from squeezeflow.errors import BadInput
from squeezeflow.export import export
from squeezeflow.kernels.intpack import pack_rows
from squeezeflow.models import load_model
from squeezeflow.store import LocalStore

pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed (pip install -e '.[test]')")

CALIB = CalibrationSpec(n_samples=4, seqlen=32, seed=0)
EVAL = EvalSpec(seqlen=32, max_windows=2)


@pytest.fixture(scope="module")
def packed_dirs(tiny_model, tmp_path_factory):
    """Packed tiny-model checkpoints from the real pipeline, by recipe."""
    store = LocalStore(tmp_path_factory.mktemp("export-store"))
    out = {}
    for recipe in ("rtn-w4g32", "gptq-w3g32", "rtn-w4g32-sym", "gptq-w4g32-sym", "wanda-p2:4", "magnitude-p50"):
        plan = pipeline.preflight(ModelRef(ref=str(tiny_model)), recipe, CALIB, EVAL)
        calib = pipeline.calibrate(store, plan.model, plan.calibration)
        stats = pipeline.saliency(store, plan.model, calib, plan.statistics)
        _, packed = pipeline.compress_to_packed(store, plan, calib, stats)
        out[recipe] = store.materialize(packed)
    return out


def logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def load_with_compressed_tensors(path):
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    # dequantize=True: compressed-tensors' ModelCompressor decompresses every packed module on load.
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=CompressedTensorsConfig(dequantize=True),
                                                dtype=torch.float32).eval()


@pytest.mark.parametrize("recipe,zero_points", [("rtn-w4g32", "padded"), ("gptq-w3g32", "packed"),
                                                ("gptq-w4g32-sym", "padded")])
def test_intq_export_decompresses_to_our_logits(packed_dirs, recipe, zero_points, tmp_path):
    src = packed_dirs[recipe]
    # float32 scales: dequantize=True computes each weight in the scale dtype (fp16 would round the products;
    # the plain load below casts the scales to the model's dtype first and is exact with fp16 scales).
    dest = export(str(src), tmp_path / "ct", zero_points=zero_points, scale_dtype="float32")
    config = json.loads((dest / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    (group,) = qc["config_groups"].values()
    assert group["weights"]["num_bits"] == int(recipe.split("-w")[1][0])
    assert group["weights"]["symmetric"] is recipe.endswith("-sym")
    assert len(group["targets"]) == 14  # 7 linears x 2 blocks, named exactly
    with safe_open(dest / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.up_proj.weight_packed" in keys and "model.layers.0.mlp.up_proj.weight" not in keys
    assert ("model.layers.0.mlp.up_proj.weight_zero_point" in keys) is not recipe.endswith("-sym")
    assert not (dest / "manifest.json").exists() and (dest / "tokenizer.json").exists()

    theirs = load_with_compressed_tensors(dest)
    assert type(theirs.model.layers[0].mlp.up_proj) is torch.nn.Linear  # decompressed, not our module
    ours = load_model(src)
    torch.testing.assert_close(logits(theirs), logits(ours), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recipe", ["wanda-p2:4", "magnitude-p50"])
def test_pruned_export_is_a_dense_checkpoint_with_zeros(packed_dirs, recipe, tmp_path):
    from transformers import AutoModelForCausalLM

    src = packed_dirs[recipe]
    dest = export(str(src), tmp_path / "dense")
    assert "quantization_config" not in json.loads((dest / "config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32).eval()
    weight = plain.model.layers[1].mlp.down_proj.weight
    assert 0.45 <= (weight == 0).float().mean().item() <= 0.55
    torch.testing.assert_close(logits(plain), logits(load_model(src)), rtol=1e-5, atol=1e-5)


def test_export_is_byte_identical_across_runs(packed_dirs, tmp_path):
    a = export(str(packed_dirs["gptq-w3g32"]), tmp_path / "a")
    b = export(str(packed_dirs["gptq-w3g32"]), tmp_path / "b")
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    with pytest.raises(BadInput, match="not empty"):
        export(str(packed_dirs["gptq-w3g32"]), a)


def test_plain_checkpoint_passes_through(tiny_model, tmp_path):
    dest = export(str(tiny_model), tmp_path / "plain")
    with safe_open(tiny_model / "model.safetensors", "pt") as a, safe_open(dest / "model.safetensors", "pt") as b:
        assert set(a.keys()) == set(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


@pytest.mark.parametrize("bits", [2, 3, 5, 8])
def test_packing_matches_compressed_tensors(bits):
    """Our unsigned bitstreams are compressed-tensors' packed signed codes, for every width (3 and 5
    straddle words); the zero-points' dim-0 packing is the transposed row packing."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (7, 70), generator=g)
    signed = (codes - 2 ** (bits - 1)).to(torch.int8)
    assert torch.equal(pack_rows(codes, bits), pack_to_int32(signed, bits))
    assert torch.equal(pack_rows(codes.T.contiguous(), bits).T, pack_to_int32(signed, bits, packed_dim=0))


def refuse_format(tiny_model, tmp_path, fmt: str):
    src = tmp_path / "src"
    shutil.copytree(tiny_model, src)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "squeezeflow", "format_version": 1,
                                     "modules": {"model.layers.0.mlp.up_proj": {"format": fmt}}}
    (src / "config.json").write_text(json.dumps(config))
    return src


@pytest.mark.parametrize("fmt,reason", [("vq", "codebook"), ("intq_outliers", "outliers"), ("quad", "rotations"),
                                        ("brand-new", "no compressed-tensors equivalent")])
def test_inexpressible_formats_are_refused_with_the_reason(tiny_model, tmp_path, fmt, reason):
    src = refuse_format(tiny_model, tmp_path, fmt)
    with pytest.raises(BadInput, match=reason) as exc:
        export(str(src), tmp_path / "out")
    assert repr(fmt) in str(exc.value) and not (tmp_path / "out").exists()


def test_cli_export(tiny_model, packed_dirs, tmp_path, capsys):
    assert main(["export", str(packed_dirs["rtn-w4g32"]), "--dest", str(tmp_path / "ok")]) == 0
    assert (tmp_path / "ok" / "config.json").exists()
    src = refuse_format(tiny_model, tmp_path, "vq")
    assert main(["export", str(src), "--format", "compressed-tensors", "--dest", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'vq'" in err[0]
    assert main(["export", str(tmp_path / "missing"), "--dest", str(tmp_path / "x")]) == 2


# ---- plain transformers, no squeezeflow ---------------------------------------------------------
IDS = [[1, 17, 300, 4000, 25, 9, 77, 1234]]
PLAIN_LOADER = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
from safetensors.torch import save_file
for name, path in json.loads(sys.argv[1]).items():
    model = AutoModelForCausalLM.from_pretrained(path).eval()   # no arguments: whatever a new user types
    with torch.no_grad():
        logits = model(torch.tensor(IDS)).logits.float().contiguous()
    save_file({"logits": logits}, sys.argv[2] + f"/{name}.safetensors")
assert not any(m == "squeezeflow" or m.startswith("squeezeflow.") for m in sys.modules)
""".replace("IDS", repr(IDS))


def plain_logits(dirs: dict, tmp_path) -> dict[str, torch.Tensor]:
    """Logits of each directory loaded by plain `from_pretrained` in a process that never imports squeezeflow."""
    from safetensors.torch import load_file

    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run([sys.executable, "-c", PLAIN_LOADER, json.dumps({k: str(v) for k, v in dirs.items()}),
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {name: load_file(tmp_path / f"{name}.safetensors")["logits"] for name in dirs}


def test_plain_from_pretrained_loads_every_intq_export_with_our_logits(packed_dirs, tmp_path):
    """Symmetric (the -sym presets) and asymmetric grids, fp16 scales: exactly our logits. bf16 scales round
    each fp16 scale to 8 significant bits (relative error <= 2^-9), so those logits agree to about 1%."""
    exports = {recipe: export(str(packed_dirs[recipe]), tmp_path / recipe)
               for recipe in ("rtn-w4g32", "gptq-w3g32", "rtn-w4g32-sym", "gptq-w4g32-sym")}
    exports["bf16"] = export(str(packed_dirs["gptq-w4g32-sym"]), tmp_path / "bf16", scale_dtype="bfloat16")
    theirs = plain_logits(exports, tmp_path)
    with torch.no_grad():
        ours = {r: load_model(packed_dirs[r])(torch.tensor(IDS)).logits for r in packed_dirs}
    for recipe in ("rtn-w4g32", "gptq-w3g32", "rtn-w4g32-sym", "gptq-w4g32-sym"):
        torch.testing.assert_close(theirs[recipe], ours[recipe], rtol=0, atol=0)
    assert not torch.equal(theirs["bf16"], ours["gptq-w4g32-sym"])
    torch.testing.assert_close(theirs["bf16"], ours["gptq-w4g32-sym"], rtol=0.01, atol=0.01)


def test_symmetric_export_has_no_zero_points_and_fp16_scales(packed_dirs, tmp_path):
    dest = export(str(packed_dirs["rtn-w4g32-sym"]), tmp_path / "sym")
    with safe_open(dest / "model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if k.endswith("zero_point")]
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight_scale").dtype == torch.float16
    assert "transformers_weights" not in json.loads((dest / "config.json").read_text())


def test_packed_zero_points_are_compressed_tensors_own_layout(packed_dirs, tmp_path):
    """zero_points="packed" is what compressed-tensors' compressor writes (and vLLM reads); "padded" holds the
    same words in the [out, groups] shape transformers builds, zeros below."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    src = packed_dirs["gptq-w3g32"]
    packed = export(str(src), tmp_path / "packed", zero_points="packed")
    padded = export(str(src), tmp_path / "padded")
    with safe_open(src / "model.safetensors", "pt") as f:
        zeros = f.get_tensor("model.layers.1.mlp.down_proj.zeros")
    with safe_open(packed / "model.safetensors", "pt") as a, safe_open(padded / "model.safetensors", "pt") as b:
        zp_packed = a.get_tensor("model.layers.1.mlp.down_proj.weight_zero_point")
        zp_padded = b.get_tensor("model.layers.1.mlp.down_proj.weight_zero_point")
    signed = (zeros.to(torch.int64) - 4).to(torch.int8)
    assert torch.equal(zp_packed, pack_to_int32(signed, 3, packed_dim=0))
    assert zp_packed.shape[0] == -(-zeros.shape[0] * 3 // 32) and zp_padded.shape == zeros.shape
    assert torch.equal(zp_padded[:zp_packed.shape[0]], zp_packed) and not zp_padded[zp_packed.shape[0]:].any()
    with pytest.raises(BadInput, match="zero-point layout"):
        export(str(src), tmp_path / "x", zero_points="unpacked")
    with pytest.raises(BadInput, match="scale dtype"):
        export(str(src), tmp_path / "x", scale_dtype="float8")


# ---- presets ------------------------------------------------------------------------------------
def test_sym_presets_and_unchanged_dumps():
    from squeezeflow.methods.intq.gptq import parse_preset as gptq_preset
    from squeezeflow.methods.intq.rtn import parse_preset as rtn_preset

    assert rtn_preset("rtn-w4g64-sym")[0].sym is True and gptq_preset("gptq-w4g64-sym")[0].sym is True
    assert gptq_preset("gptq-w4g64-sym-act-mse")[0].act_order is True
    # Older presets dump (and so key their caches) exactly as before the option existed.
    assert rtn_preset("rtn-w4g64")[0].model_dump(mode="json") == {"method": "rtn", "bits": 4, "group_size": 64}
    assert "sym" not in rtn_preset("rtn-w8gc")[0].model_dump(mode="json")
    assert gptq_preset("gptq-w4g64")[0].model_dump(mode="json")["sym"] is False


def test_rtn_symmetric_grid_is_gptq_cores():
    from squeezeflow.methods.intq.gptq_core import fit_grid
    from squeezeflow.methods.intq.rtn import quantize_groupwise

    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(0))
    codes, scales, zeros = quantize_groupwise(w, 4, 32, sym=True)
    s, z = fit_grid(w.reshape(-1, 32), None, 4, sym=True)
    assert torch.equal(scales.float().reshape(-1), s) and torch.equal(zeros.float().reshape(-1), z)
    assert (zeros == 8).all()
    ref = torch.clamp(torch.round(w.reshape(-1, 32) / s[:, None]) + z[:, None], 0, 15)
    assert torch.equal(codes.reshape(-1, 32).float(), ref)


# ---- hf: Hub-ready folder and model card --------------------------------------------------------
@pytest.fixture(scope="module")
def artifact(tiny_model, tmp_path_factory):
    """A whole run (evaluation, assemble) of a symmetric preset."""
    from sf_testing import run_stages

    store = LocalStore(tmp_path_factory.mktemp("export-artifact"))
    job = pipeline.preflight(ModelRef(ref=str(tiny_model)), "rtn-w4g32-sym", CALIB, EVAL)
    return store.materialize(run_stages(store, job)["artifact"])


def front_matter(text: str) -> dict:
    import yaml

    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_artifact_carries_a_model_card_in_its_manifest(artifact):
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert "README.md" in manifest["files"]
    card = (artifact / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert "base_model" not in meta  # a local path is no Hub id
    assert {"squeezeflow", "rtn", "4-bit"} <= set(meta["tags"])
    assert meta["quantization"] == {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True,
                                    "bits_per_weight": manifest["metrics"]["bits_per_weight"],
                                    "format": "squeezeflow intq"}
    assert "import squeezeflow" in card and "## Calibration" in card and "## Recipe" in card
    base, ours = manifest["baseline"], manifest["metrics"]
    for split, ppl in ours["perplexity"].items():
        row = next(line for line in card.splitlines() if line.startswith(f"| {ours['recipe']} |"))
        assert f"{ppl:.3f}" in row and f"{base['perplexity'][split]:.3f}" in card


def test_hf_export_is_a_hub_ready_folder(artifact, tmp_path):
    dest = export(str(artifact), tmp_path / "hf", "hf")
    names = {p.name for p in dest.iterdir()}
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not names & {"manifest.json", "report"}
    assert (dest / "README.md").read_text() == (artifact / "README.md").read_text()
    assert (dest / "model.safetensors").read_bytes() == (artifact / "model.safetensors").read_bytes()
    with torch.no_grad():
        torch.testing.assert_close(load_model(dest)(torch.tensor(IDS)).logits,
                                   load_model(artifact)(torch.tensor(IDS)).logits, rtol=0, atol=0)
    ct = export(str(artifact), tmp_path / "ct")
    meta = front_matter((ct / "README.md").read_text())
    assert meta["quantization"]["format"] == "compressed-tensors pack-quantized" and "compressed-tensors" in meta["tags"]
    assert "import squeezeflow" not in (ct / "README.md").read_text()


def test_base_model_is_a_hub_id_when_known():
    from squeezeflow.modelcard import base_model_id

    assert base_model_id({"ref": "smollm2-135m", "name": "smollm2-135m"}) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_id({"ref": "Qwen/Qwen2.5-0.5B", "name": "Qwen2.5-0.5B"}) == "Qwen/Qwen2.5-0.5B"
    assert base_model_id({"ref": "/tmp/some/dir", "name": "dir"}) is None


def test_cli_export_hf_and_options(artifact, tmp_path, capsys):
    assert main(["export", str(artifact), "--format", "hf", "--dest", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "README.md").exists()
    assert main(["export", str(artifact), "--scale-dtype", "bfloat16", "--dest", str(tmp_path / "bf")]) == 0
    with safe_open(tmp_path / "bf" / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight_scale").dtype == torch.bfloat16


def test_hub_token_comes_from_the_environment(monkeypatch):
    """The upload itself needs the Hub (not tested offline); where its token comes from is."""
    from squeezeflow.export import hub_token

    monkeypatch.setenv("HF_TOKEN", " hf_abc ")
    assert hub_token() == "hf_abc"
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("SQUEEZEFLOW_HF_TOKEN_BLOCK", raising=False)
    assert hub_token() is None   # huggingface_hub then uses its own login, if any
