"""Fuzzing (hypothesis): whatever bytes or values arrive, the parsers and packed-format decoders either
accept them or raise our validation error (BadInput / IntegrityError / ValueError); they never crash
with another exception and never hang (each example has a deadline)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from squeezeflow.recipes import load_recipe, preset
from squeezeflow.errors import BadInput, IntegrityError
from squeezeflow.kernels import expgolomb, intpack
from squeezeflow.kernels.formats import FORMATS, make_module
from squeezeflow.registry import read_manifest, verify_dir

FUZZ = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture],
                derandomize=True)  # the same examples every run: a failure reproduces
OURS = (BadInput, IntegrityError, ValueError)

json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
                           | st.text(max_size=20), lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)


def _only_ours(fn, *args):
    try:
        fn(*args)
    except OURS:
        pass


@FUZZ
@given(st.text(max_size=40) | st.from_regex(r"(rtn|gptq|gwq|nowag-p|wanda|quad|nowag-vq|rf8|fp8|trsp|sleb)[-\w:]{0,20}",
                                            fullmatch=True))
def test_recipe_names(name):
    _only_ours(preset, name)


@FUZZ
@given(st.text(max_size=300) | json_values.map(json.dumps))
def test_recipe_yaml_files(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    _only_ours(load_recipe, str(path))


@FUZZ
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode())
       | st.fixed_dictionaries({"files": json_values}).map(lambda v: json.dumps(v).encode()))
def test_manifests(tmp_path, data):
    (tmp_path / "manifest.json").write_bytes(data)
    _only_ours(read_manifest, tmp_path)
    _only_ours(verify_dir, tmp_path)


param_values = st.none() | st.booleans() | st.integers(-3, 70000) | st.floats(-2, 70000, allow_nan=False) \
    | st.text(max_size=8) | st.lists(st.integers(-2, 9), max_size=3)


@FUZZ
@given(st.sampled_from(sorted(FORMATS)), st.dictionaries(st.sampled_from(
    ["bits", "group_size", "n", "m", "outlier_cols", "act_bits", "act_clip", "rotate", "d", "codebook_size",
     "nnz", "stream_bytes", "chunks", "symbols", "format", "inner", "exp_bits", "k", "col_dtype"]),
    param_values, max_size=6), st.integers(-1, 600), st.integers(-1, 600), st.booleans())
def test_format_params(fmt, params, in_f, out_f, bias):
    """A quantization_config entry from an untrusted config.json: a module of sane size, or ValueError."""
    try:
        make_module(fmt, params, in_f, out_f, bias)
    except (ValueError, BadInput):
        pass


@FUZZ
@given(st.binary(max_size=200), st.binary(min_size=1, max_size=16), st.lists(st.integers(-100, 5000), max_size=4),
       st.integers(0, 3000))
def test_exp_golomb_decoder(stream, symbols, offsets, n):
    out = None
    try:
        out = expgolomb.decode(np.frombuffer(stream, np.uint8), np.frombuffer(symbols, np.uint8),
                               np.array(offsets, np.int64), n)
    except ValueError:
        return
    assert out.shape == (n,) and set(np.unique(out).tolist()) <= set(symbols)


@FUZZ
@given(st.binary(min_size=4, max_size=256), st.integers(1, 16), st.integers(-2, 100))
def test_intpack_unpack(data, bits, n):
    words = torch.frombuffer(bytearray(data[: len(data) // 4 * 4]), dtype=torch.int32).reshape(1, -1)
    try:
        codes = intpack.unpack_rows(words, bits, n)
    except ValueError:
        return
    assert codes.shape == (1, n)
    assert n == 0 or (int(codes.min()) >= 0 and int(codes.max()) < 2 ** bits)



header_entries = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I8", "U8", "Q4", ""]) | json_values,
    "shape": st.lists(st.integers(-2, 6), max_size=3) | json_values,
    "data_offsets": st.lists(st.integers(-4, 300), min_size=2, max_size=2) | json_values,
})


@FUZZ
@given(st.dictionaries(st.text(max_size=8), header_entries | json_values, max_size=4), st.binary(max_size=300),
       st.integers(-16, 16))
def test_safetensors_headers(tmp_path, header, data, length_delta):
    """Any header, any data, a wrong header length: read_header gives BadInput and nothing else, and what it
    accepts the safetensors library opens too (it is never looser than the format)."""
    from safetensors import safe_open

    from squeezeflow.checkpoint_check import read_header

    raw = json.dumps(header).encode()
    f = tmp_path / "w.safetensors"
    f.write_bytes(max(0, len(raw) + length_delta).to_bytes(8, "little") + raw + data)
    try:
        tensors = read_header(f, "weights")
    except BadInput:
        return
    with safe_open(f, "np") as st_file:
        assert sorted(st_file.keys()) == sorted(tensors)


@FUZZ
@given(st.text(max_size=200) | json_values.map(lambda v: json.dumps(v)))
def test_recipe_yaml_refusals_are_bad_input(tmp_path, text):
    """A recipe file is a Recipe or a BadInput: never a TypeError, RecursionError or bare ValueError."""
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    try:
        load_recipe(str(path))
    except BadInput:
        pass
