"""The streaming safetensors writer: readable by safetensors, exact, aligned, deterministic, atomic."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from squeezeflow.safetensors_stream import SafetensorsWriter


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.qweight": torch.randint(-2**31, 2**31 - 1, (7, 3), dtype=torch.int32, generator=g),
        "a.scales": torch.randn(7, 2, generator=g).half(),
        "b.codes": torch.randint(0, 255, (13,), dtype=torch.uint8, generator=g),
        "b.weight": torch.randn(5, 4, generator=g),
        "c.bf": torch.randn(3, generator=g).bfloat16(),
        "c.f8": torch.randn(6, generator=g).to(torch.float8_e4m3fn),
        "d.mask": torch.rand(9, generator=g) > 0.5,
        "d.empty": torch.zeros(0, 4),
        "e.scalar": torch.tensor(3.5, dtype=torch.float64),
    }


def _write(path, tensors):
    with SafetensorsWriter(path, metadata={"format": "pt", "z": "1", "a": "2"}) as w:
        for k, v in tensors.items():
            w.add(k, v)
    return path


def test_round_trip_exact_and_aligned(tmp_path):
    tensors = _tensors()
    path = _write(tmp_path / "m.safetensors", tensors)
    back = load_file(path)
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert torch.equal(back[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))  # bit-exact
    with safe_open(path, "pt") as st:
        assert st.metadata() == {"format": "pt", "z": "1", "a": "2"}
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n])
    itemsize = {"F64": 8, "I32": 4, "F32": 4, "F16": 2, "BF16": 2, "U8": 1, "F8_E4M3": 1, "BOOL": 1}
    spans = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
    assert spans[0][0] == 0 and spans[-1][1] == len(raw) - 8 - n   # the data region is exactly covered
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    for k, v in header.items():
        if k != "__metadata__":
            assert v["data_offsets"][0] % itemsize[v["dtype"]] == 0   # every tensor aligned to its element


def test_deterministic_and_order_dependent(tmp_path):
    t = _tensors()
    a = _write(tmp_path / "a.safetensors", t).read_bytes()
    b = _write(tmp_path / "b.safetensors", t).read_bytes()
    assert a == b
    c = _write(tmp_path / "c.safetensors", dict(reversed(list(t.items())))).read_bytes()
    assert load_file(tmp_path / "c.safetensors").keys() == load_file(tmp_path / "a.safetensors").keys()
    assert c != a   # insertion order is part of the layout (callers add in a fixed order)


def test_failure_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with SafetensorsWriter(tmp_path / "m.safetensors") as w:
            w.add("x", torch.ones(3))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="added twice"):
        with SafetensorsWriter(tmp_path / "m.safetensors") as w:
            w.add("x", torch.ones(3))
            w.add("x", torch.ones(3))
    assert list(tmp_path.iterdir()) == []
