"""`squeezeflow export --format compressed-tensors`: exported RTN/GPTQ/pruned artifacts decompress with
compressed-tensors' own code (through transformers' compressed-tensors quantizer) to logits equal to ours."""

import json
import shutil

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
    for recipe in ("rtn-w4g32", "gptq-w3g32", "wanda-p2:4", "magnitude-p50"):
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


@pytest.mark.parametrize("recipe", ["rtn-w4g32", "gptq-w3g32"])
def test_intq_export_decompresses_to_our_logits(packed_dirs, recipe, tmp_path):
    src = packed_dirs[recipe]
    dest = export(str(src), tmp_path / "ct")
    config = json.loads((dest / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    (group,) = qc["config_groups"].values()
    assert group["weights"]["num_bits"] == int(recipe.split("-w")[1][0]) and group["weights"]["symmetric"] is False
    assert len(group["targets"]) == 14  # 7 linears x 2 blocks, named exactly
    with safe_open(dest / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.up_proj.weight_packed" in keys and "model.layers.0.mlp.up_proj.weight" not in keys
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
