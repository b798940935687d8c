"""Packed weights are byte-identical to what the code produced before the trunk refactor (issue 22): for
every method family, the sha256 of the packed model.safetensors on the tiny Llama, recorded with the
pre-refactor pipeline (commit 2520c00) before any change. A change here means a method, a statistic or
the packing changed its output: if that is intended, say why and re-record.

TRSP trains the kept blocks (AdamW over many steps), and its weights follow the CPU's float kernels: the
same code gives other bytes on another instruction set (measured: AVX512 vs AVX2 on one machine differ by
4e-6 relative, in 268k of 3.2M weights). Its pins are therefore the packed file's layout (names, shapes,
dtypes, metadata: exact) and each tensor's L1 and L2 norms (within 1e-6 relative: AVX2 and AVX512 agree within
2e-9, far below any change of method), plus byte identity of two runs on the same machine."""
import pytest

from squeezeflow.config import CalibrationSpec, EvalSpec
from squeezeflow.store import LocalStore
from sf_testing import packed_sha256, packed_summary

CALIB = CalibrationSpec(n_samples=4, seqlen=64, seed=0)
EVAL = EvalSpec(seqlen=32, max_windows=2)

PINNED = {
    "rtn-w4g32": "e5a15b7dc599a8e4d2db72e748ce643fe48293d244dfaf16b8ce45180e65d71c",
    "gptq-w3g32-act-mse": "ddc9512d6e4c67a25164abf97de24bd2ad30270a820851cc0d4b391e0ec4ab09",
    "gwq-w3g32": "feea3c7441d678feaad31492dfe8de7d61cbf9d7b508afd997e239db50d854cf",
    "gwq-w3g32-gptq": "3b71818ba78872a4844628078318a39835f4787060b37445c3246ddb8ba03610",
    "nowag-p50": "7dacbe5d9e3fd55fbdbb33ae2532ec9d0ba4d59d062a5606d9f38aac68ef52bd",
    "nowag-p2:4": "4a84ecc1fac8530c2256b289389f3447b187532ae7f65c5fe3a847ea441f2af3",
    "wanda-p50": "a560a804f3fbb95c45555d517d24c974c20051d4561c42fb5d57283eebfa8a5a",
    "nowag-vq2d4": "c378687a18ae3a9b527dba996abecb7bb0429398df4066b03e451ce0a4522f2d",
    "quad-w4a4a8": "7bd28c21c5aae6456bdd4911747e6e6e62abfff13851b0a3a117c17fb0505450",
    "quarot-w4a4": "27c99e931633c4b96ad3e568e420896f62ce84f6f53b07d65f14760e9a994d1f",
    "quad-w4a4a8-peft4": "0e94177697f154aa0d7fcbb8a85f3afaece1255df4ee1f486a06c72a06f62272",
    "rf8": "bad1a6706437d0958a5ef817860806df14eee092bc10a7e015a894a99f3dbdd5",
    "fp8-e4m3": "d250c806eeb3a89fe7de181e4120224c7b1c5e106404147aea9136ef6488ba49",
    "rf8-gptq": "d8a172c5558ca2bbf3cce203a8106ec550669e5aa9a9fa964cfb0a087a5ef5ad",
    "rtn-w4g32-eg": "89dfea5c6cb22b7ad7f4a52e59ff1f386397e05101c619410b2103fab2ee1139",
    "backslash-l1000-w8gc-s2": "1e2661e25013d07bee548350bc86a1bc582d016a61fcaea7b18a542ca7018b5b",
    "sleb-50": "2a26856b242b4c4aa3c57374c8ef1432ed377c1ca71f305c9e65b570bf711f6c",
    "shortgpt-50": "f4afa0232abaa3c66d9c7f542dc77828adceeaa913709971de8956f8391c2a84",
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return LocalStore(tmp_path_factory.mktemp("pins-store"))  # shared: one calibration, one statistics pass


TRAINED = ("trsp-50", "trsp-50+rtn-w4g32")
PINNED_TRAINED = {  # recorded on an AMD EPYC (AVX512); AVX2 on the same machine agrees within 2e-9
    "trsp-50": {"layout": "2692a17849372f9bcdc6ab8be6bf6e20a5775daa822f2ae62f835617ca0a0229", "norms": {
        "model.embed_tokens.weight": [50171.3794055, 1257.18482363],
        "model.layers.0.input_layernorm.weight": [63.9983373284, 63.9966888057],
        "model.layers.0.mlp.down_proj.weight": [131.070372913, 3.31603343165],
        "model.layers.0.mlp.gate_proj.weight": [131.022748654, 3.25618377247],
        "model.layers.0.mlp.up_proj.weight": [130.412287544, 3.2841729218],
        "model.layers.0.post_attention_layernorm.weight": [64.0064415336, 64.0128948537],
        "model.layers.0.self_attn.k_proj.weight": [32.3877000854, 0.789320083476],
        "model.layers.0.self_attn.o_proj.weight": [64.9465890052, 1.62317571891],
        "model.layers.0.self_attn.q_proj.weight": [64.894369162, 1.60536168201],
        "model.layers.0.self_attn.v_proj.weight": [33.190218396, 0.812102962706],
        "model.norm.weight": [64.0108921528, 64.021799611],
    }},
    "trsp-50+rtn-w4g32": {"layout": "0f37a25cc8ec48cc64bb597a883176de3854699927be9aef9afda25384a88e82", "norms": {
        "model.embed_tokens.weight": [50171.3794055, 1257.18482363],
        "model.layers.0.input_layernorm.weight": [63.9983373284, 63.9966888057],
        "model.layers.0.mlp.down_proj.qweight": [1.37543842899e+12, 2.18753388869e+21],
        "model.layers.0.mlp.down_proj.scales": [1.44254302979, 0.0082921427238],
        "model.layers.0.mlp.down_proj.zeros": [1916, 14788],
        "model.layers.0.mlp.gate_proj.qweight": [1.34032968929e+12, 2.11339282333e+21],
        "model.layers.0.mlp.gate_proj.scales": [1.40628242493, 0.00790808772945],
        "model.layers.0.mlp.gate_proj.zeros": [1927, 14963],
        "model.layers.0.mlp.up_proj.qweight": [1.33902925347e+12, 2.08839281666e+21],
        "model.layers.0.mlp.up_proj.scales": [1.41697883606, 0.00804923716714],
        "model.layers.0.mlp.up_proj.zeros": [1919, 14781],
        "model.layers.0.post_attention_layernorm.weight": [64.0064415336, 64.0128948537],
        "model.layers.0.self_attn.k_proj.qweight": [326174882881, 4.96519144212e+20],
        "model.layers.0.self_attn.k_proj.scales": [0.339681625366, 0.00187972829372],
        "model.layers.0.self_attn.k_proj.zeros": [484, 3754],
        "model.layers.0.self_attn.o_proj.qweight": [675608430908, 1.07461606897e+21],
        "model.layers.0.self_attn.o_proj.scales": [0.709815979004, 0.00403400330833],
        "model.layers.0.self_attn.o_proj.zeros": [935, 7045],
        "model.layers.0.self_attn.q_proj.qweight": [667506895647, 1.03993816742e+21],
        "model.layers.0.self_attn.q_proj.scales": [0.701337814331, 0.00396839902896],
        "model.layers.0.self_attn.q_proj.zeros": [954, 7354],
        "model.layers.0.self_attn.v_proj.qweight": [344996027191, 5.46479426904e+20],
        "model.layers.0.self_attn.v_proj.scales": [0.342029571533, 0.00185756567225],
        "model.layers.0.self_attn.v_proj.zeros": [459, 3395],
        "model.norm.weight": [64.0108921528, 64.021799611],
    }},
}


@pytest.mark.parametrize("recipe", TRAINED)
def test_trained_packings_keep_their_layout_and_norms(recipe, tiny_model, store, tmp_path):
    from squeezeflow.config import ModelRef
    from squeezeflow import pipeline

    job = pipeline.preflight(ModelRef(ref=str(tiny_model)), recipe, CALIB, EVAL)
    _, packed = pipeline.compress_to_packed(store, job)
    got = packed_summary(store.materialize(packed) / "model.safetensors")
    want = PINNED_TRAINED[recipe]
    assert got["layout"] == want["layout"] and sorted(got["norms"]) == sorted(want["norms"])
    for k, (l1, l2) in want["norms"].items():
        assert got["norms"][k] == pytest.approx([l1, l2], rel=1e-6), k
    # The same machine gives the same bytes: a fresh store computes every stage again.
    assert packed_sha256(LocalStore(tmp_path / "again"), tiny_model, recipe, CALIB, EVAL) == \
        store.get_tree(packed)["model.safetensors"].sha256


@pytest.mark.parametrize("recipe", sorted(PINNED))
def test_packed_weights_are_byte_identical_to_before_the_refactor(recipe, tiny_model, store):
    assert packed_sha256(store, tiny_model, recipe, CALIB, EVAL) == PINNED[recipe]
