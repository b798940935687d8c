import pytest
import torch

from squeezeflow.errors import IntegrityError
from squeezeflow.store import LocalStore, canonical_json


def test_put_get_roundtrip_and_dedup(tmp_path):
    store = LocalStore(tmp_path)
    a = store.put_bytes(b"hello", "blob")
    b = store.put_bytes(b"hello", "blob")
    assert a == b and a.size == 5 and a.uri == f"sfs://{a.sha256}"
    assert store.get_bytes(a) == b"hello"
    assert len(list((tmp_path / "objects").rglob("*"))) == 2  # one shard dir + one object


def test_tensors_are_deterministic_bytes(tmp_path):
    store = LocalStore(tmp_path)
    t = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(4, dtype=torch.int32)}
    r1 = store.put_tensors(t, "x", metadata={"k": "v"})
    r2 = store.put_tensors(dict(reversed(list(t.items()))), "x", metadata={"k": "v"})
    assert r1.sha256 == r2.sha256
    back = store.get_tensors(r1)
    assert torch.equal(back["b"], t["b"]) and torch.equal(back["a"], t["a"])
    assert store.get_tensors_metadata(r1) == {"k": "v"}


def test_corrupted_object_is_refused(tmp_path):
    store = LocalStore(tmp_path)
    ref = store.put_bytes(b"payload", "blob")
    path = tmp_path / "objects" / ref.sha256[:2] / ref.sha256
    path.write_bytes(b"pAyload")
    with pytest.raises(IntegrityError, match="corrupted"):
        store.get_bytes(ref)


def test_tree_materialize_and_index(tmp_path):
    store = LocalStore(tmp_path / "s")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("A")
    (src / "sub" / "b.bin").write_bytes(b"\x00\x01")
    tree = store.put_dir(src)
    out = store.materialize(tree, tmp_path / "out")
    assert (out / "a.txt").read_text() == "A" and (out / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in out.rglob("*")) == ["a.txt", "b.bin", "sub"]  # no marker inside the tree
    assert store.get_index("k") is None
    store.put_index("k", tree)
    assert store.get_index("k") == tree


def test_tree_rejects_escaping_paths(tmp_path):
    store = LocalStore(tmp_path)
    ref = store.put_bytes(b"x", "file")
    with pytest.raises(ValueError, match="escapes"):
        store.put_tree({"../evil": ref})


def test_canonical_json_is_order_independent():
    assert canonical_json({"b": 1, "a": [1, 2]}) == canonical_json({"a": [1, 2], "b": 1})


def test_safetensors_header_is_canonical(tmp_path):
    from safetensors.torch import load, save

    from squeezeflow.store import canonical_safetensors

    t = {"x": torch.arange(5.0), "y": torch.ones(3, dtype=torch.int32)}
    meta = {f"k{i}": str(i) for i in range(12)}
    outs = {canonical_safetensors(save(t, metadata=dict(reversed(list(meta.items())) if i % 2 else meta.items())))
            for i in range(6)}
    assert len(outs) == 1
    data = outs.pop()
    assert int.from_bytes(data[:8], "little") % 8 == 0
    assert torch.equal(load(data)["x"], t["x"]) and torch.equal(load(data)["y"], t["y"])
    store = LocalStore(tmp_path)
    assert store.get_tensors_metadata(store.put_tensors(t, "x", metadata=meta)) == meta
