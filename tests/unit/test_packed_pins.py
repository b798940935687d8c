"""Packed weights are byte-identical to what the code produced before the trunk refactor (issue 22): for
every method family, the sha256 of the packed model.safetensors on the tiny Llama, recorded with the
pre-refactor pipeline (commit 2520c00) before any change. A change here means a method, a statistic or
the packing changed its output: if that is intended, say why and re-record."""
import pytest

from squeezeflow.config import CalibrationSpec, EvalSpec
from squeezeflow.store import LocalStore
from sf_testing import packed_sha256

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
    "trsp-50": "a8da74700556ea4939c6bc565aa9bdc423760279f7aa447db31e457f437bc11d",
    "sleb-50": "2a26856b242b4c4aa3c57374c8ef1432ed377c1ca71f305c9e65b570bf711f6c",
    "shortgpt-50": "f4afa0232abaa3c66d9c7f542dc77828adceeaa913709971de8956f8391c2a84",
    "trsp-50+rtn-w4g32": "3627ba54fa142a2ca965212048f7854db33df9d4e1fe724c7618a5c89e84d40c",
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return LocalStore(tmp_path_factory.mktemp("pins-store"))  # shared: one calibration, one statistics pass


@pytest.mark.parametrize("recipe", sorted(PINNED))
def test_packed_weights_are_byte_identical_to_before_the_refactor(recipe, tiny_model, store):
    assert packed_sha256(store, tiny_model, recipe, CALIB, EVAL) == PINNED[recipe]
