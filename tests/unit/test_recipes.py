"""Recipes validate their methods through the method registry (squeezeflow/methods/registry.py), and a
recipe dumps exactly as it did when every method config lived in config.py: cache keys, artifact ids and
manifests are computed from these dumps."""
import hashlib
import json
from typing import Literal

import pytest
from pydantic import ValidationError

from squeezeflow.config import CalibrationSpec, Spec
from squeezeflow.errors import BadInput
from squeezeflow.methods import WeightMethod, register, registry
from squeezeflow.methods.intq import GPTQConfig, RTNConfig
from squeezeflow.recipes import PRESET_EXAMPLES, Recipe, load_recipe, preset

# Every preset example before the refactor, and more spellings of each family's grammar.
PINNED_NAMES = [
    "backslash-l1000-w8gc-s20", "fp8-e4m3", "fp8-e4m3-gptq", "gptq-w3g64", "gptq-w4g64-act", "gwq-w3g64",
    "gwq-w3g64-fisher-n32-o2", "gwq-w3g64-gptq", "lastlayers-25", "magnitude-p50", "nowag-p2:4", "nowag-p4:8",
    "nowag-p50", "nowag-vq2", "nowag-vq3", "quad-w4a4", "quad-w4a4-r16", "quad-w4a4a8", "quad-w4a4a8-peft",
    "quarot-w4a4", "rf8", "rf8-eg", "rf8-gptq", "rtn-w3g64", "rtn-w4g64", "rtn-w4g64-eg", "rtn-w8gc", "shortgpt-25",
    "sleb-25", "trsp-25", "trsp-25+gwq-w4g64", "trsp-25-no-iter", "wanda-p2:4", "wanda-p50",
    "gptq-w3g32-act-static-mse", "gwq-w4gc-gptq-random-n4-o0.5", "nowag-vq4d2", "magnitude4:8", "quad-w8a16-r0-peft",
    "quarot-w4a6", "trsp-30-no-iter-no-stage2", "lastlayers-10+sleb-10+rtn-w2", "backslash-l0-w4g32-s3-lr1e-4",
    "rf8-gptq-eg", "gptq-w4gc-mse-eg", "fp8-e4m3-gptq"]
# sha256 of json.dumps([load_recipe(n).model_dump(mode="json") for n in PINNED_NAMES]), recorded with the
# pre-refactor config.py (commit 2520c00): field order, defaults and omitted unset fields.
DUMPS_SHA256 = "114523bd9964351594b31d115b091b3fc369037f28f73d97c06bc91f89450af5"


def test_recipe_dumps_are_unchanged_by_the_registry():
    dumps = [load_recipe(n).model_dump(mode="json") for n in PINNED_NAMES]
    assert hashlib.sha256(json.dumps(dumps).encode()).hexdigest() == DUMPS_SHA256


def test_methods_are_validated_as_their_registered_class_and_round_trip():
    r = Recipe(name="x", methods=[{"method": "gptq", "bits": 3, "mse_clip": True}, RTNConfig(bits=8)])
    assert [type(m) for m in r.methods] == [GPTQConfig, RTNConfig]
    assert r.model_dump(mode="json")["methods"][1] == {"method": "rtn", "bits": 8, "group_size": 64}
    assert Recipe.model_validate(r.model_dump(mode="json")) == r
    assert Recipe.model_validate_json(r.model_dump_json()) == r


@pytest.mark.parametrize("methods, message", [
    ([{"method": "awq"}], "methods.0: Input tag 'awq' found using 'method' does not match any of the expected tags: 'rtn', "),
    ([{"bits": 4}], "methods.0: each method needs a 'method' key, one of: 'rtn', "),
    ([{"method": "rtn"}, {"method": "gptq", "bits": 9}], "methods.1.gptq.bits: bits must be between 2 and 8, got 9"),
])
def test_bad_method_entries_in_a_recipe_file_say_where_and_what(tmp_path, methods, message):
    import yaml

    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump({"name": "r", "methods": methods}))
    with pytest.raises(BadInput) as e:
        load_recipe(str(f))
    assert str(e.value).startswith(f"recipe {str(f)!r}: {message}"), str(e.value)


def test_a_spec_that_is_not_a_method_config_is_refused():
    with pytest.raises(ValidationError, match="expected a method config .*, got CalibrationSpec"):
        Recipe(name="r", methods=[CalibrationSpec()])


def test_a_chain_names_the_step_that_is_wrong():
    with pytest.raises(BadInput, match=r"^recipe 'rtn-w9g32': bits: bits must be between 2 and 8, got 9$"):
        preset("trsp-25+rtn-w9g32")
    with pytest.raises(BadInput, match="empty step"):
        preset("trsp-25+")
    assert [m.method for m in preset("trsp-25+gwq-w4g64").methods] == ["trsp", "gwq"]


def test_a_name_registered_twice_by_different_classes_is_refused(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    class DupConfig(Spec):
        method: Literal["rtn"] = "rtn"

    with pytest.raises(ValueError, match="method 'rtn' is already registered by squeezeflow.methods.intq.rtn"):
        @register(DupConfig)
        class Dup(WeightMethod):
            def compress_linear(self, name, weight, stats): ...

            def dequantize(self, c): ...
    assert registry.config_class("rtn") is RTNConfig


def test_every_example_is_a_preset_of_its_family():
    for name in PRESET_EXAMPLES:
        assert preset(name).name == name
    assert len(set(PRESET_EXAMPLES)) == len(PRESET_EXAMPLES) and set(PINNED_NAMES[:34]) <= set(PRESET_EXAMPLES)
