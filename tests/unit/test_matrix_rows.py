"""matrix_rows.MatrixRows reads rows of a checkpoint matrix with plain reads: the same values as the whole
tensor converted, for every float dtype a checkpoint stores, in ranges and in gathers of repeated ids."""
import pytest
import torch
from safetensors.torch import save_file

from squeezeflow.matrix_rows import MatrixRows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rows_and_gathers_are_the_tensors_own(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    table = torch.randn(1000, 24, generator=g).to(dtype)
    other = torch.randn(7, 3, generator=g)
    save_file({"a.other": other, "model.embed_tokens.weight": table}, tmp_path / "m.safetensors")
    rows = MatrixRows(tmp_path / "m.safetensors", "model.embed_tokens.weight")
    assert rows.shape == (1000, 24) and rows.stored == dtype
    assert torch.equal(rows.rows(0, 1000, torch.float32, torch.device("cpu")), table.float())
    assert torch.equal(rows.rows(997, 1000, dtype, torch.device("cpu")), table[997:])
    ids = torch.tensor([[5, 6, 7, 999, 5, 0, 512, 6]])
    distinct, renumbered = rows.gather(ids.reshape(-1), torch.float32, torch.device("cpu"))
    assert distinct.shape == (6, 24)
    assert torch.equal(torch.nn.functional.embedding(renumbered, distinct), table.float()[ids.reshape(-1)])
    with pytest.raises(IndexError, match="out of range"):
        rows.gather(torch.tensor([3, 1000]), torch.float32, torch.device("cpu"))


def test_only_two_dimensional_float_tensors(tmp_path):
    save_file({"codes": torch.zeros(4, 4, dtype=torch.int8), "norm": torch.ones(4)}, tmp_path / "m.safetensors")
    for key in ("codes", "norm"):
        with pytest.raises(ValueError, match="2-D float"):
            MatrixRows(tmp_path / "m.safetensors", key)
