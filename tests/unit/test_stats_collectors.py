"""Statistics collectors (xtx, residual_cov, block_io, gradients) against explicit full-model references."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import squeezeflow.stats as stats_mod
import squeezeflow.stats.gradients as gradients_mod
from squeezeflow.calibration import CalibrationSet
from squeezeflow.models import decoder_linears, load_model
from squeezeflow.stats import collect
from squeezeflow.stats.gradients import collect_gradients
from squeezeflow.stats.residual_cov import pooled_residual_cov
from squeezeflow.store import LocalStore

HOOKED = ["hdiag", "xtx", "residual_cov", "block_io"]
N_WINDOWS, SEQLEN = 3, 24


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    return torch.randint(0, 49152, (N_WINDOWS, SEQLEN), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def collected(tiny_model, windows, tmp_path_factory):
    """One streamed pass with every collector, plus gradients, in a fresh store."""
    store = LocalStore(tmp_path_factory.mktemp("stats-store"))
    calib = CalibrationSet(windows=windows, provenance={"test": "collectors"}).put(store)
    refs = collect(store, tiny_model, "tiny-fp", calib, HOOKED + ["gradients"], batch_size=2,
                   gradient_windows=N_WINDOWS)
    blocks = {name: [store.get_tensors(b) for b in ref.blocks] for name, ref in refs.items()}
    return {"store": store, "calib": calib, "refs": refs, "blocks": blocks}


@pytest.fixture(scope="module")
def captured(tiny_model, windows):
    """Inputs of every linear and norm, and each block's input/output, from the fully loaded model."""
    model = load_model(tiny_model)
    seen: dict[tuple[int, str], list[torch.Tensor]] = {}
    for i, layer in enumerate(model.model.layers):
        modules = {**decoder_linears(layer), "input_layernorm": layer.input_layernorm,
                   "post_attention_layernorm": layer.post_attention_layernorm}
        for name, mod in modules.items():
            mod.register_forward_pre_hook(
                lambda m, a, key=(i, name): seen.setdefault(key, []).append(a[0].detach().reshape(-1, a[0].shape[-1])))
        layer.register_forward_hook(
            lambda m, a, kw, out, i=i: seen.setdefault((i, "io"), []).append((a[0].detach(), out.detach())),
            with_kwargs=True)
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)
    return seen


def _explicit_xtx(xs: list[torch.Tensor]) -> torch.Tensor:
    x = torch.cat(xs).double()
    return x.T @ x / x.shape[0]


def test_xtx_matches_explicit_and_hdiag(collected, captured):
    for i, block in enumerate(collected["blocks"]["xtx"]):
        assert set(block) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
        for name, h in block.items():
            assert h.dtype == torch.float32
            torch.testing.assert_close(h.double(), _explicit_xtx(captured[(i, name)]), rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(torch.diagonal(h), collected["blocks"]["hdiag"][i][name], rtol=1e-6, atol=1e-8)
        # q/k/v (and gate/up) read one tensor: computed once, stored as equal copies.
        assert torch.equal(block["self_attn.q_proj"], block["self_attn.v_proj"])
        assert torch.equal(block["mlp.gate_proj"], block["mlp.up_proj"])
    meta = collected["store"].get_tensors_metadata(collected["refs"]["xtx"].blocks[0])
    assert meta["shared"] == ('{"mlp.up_proj": "mlp.gate_proj", "self_attn.k_proj": "self_attn.q_proj", '
                              '"self_attn.v_proj": "self_attn.q_proj"}')


def test_xtx_shares_one_accumulator():
    from squeezeflow.stats.xtx import XtX

    class Fan(torch.nn.Module):  # two linears on one input, a third on another
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.c(self.a(x) + self.b(x))

    fan, col = Fan(), XtX()
    with torch.no_grad(), col.attach(fan):
        fan(torch.randn(5, 4))
        fan(torch.randn(3, 4))
    assert sorted(col._sums) == ["a", "c"] and col._count == {"a": 8, "c": 8}
    assert set(col.result()) == {"a", "b", "c"}


def test_residual_cov_matches_explicit_and_pools(collected, captured):
    explicit = []
    for i, block in enumerate(collected["blocks"]["residual_cov"]):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            want = _explicit_xtx(captured[(i, norm)])
            assert block[norm].dtype == torch.float64
            torch.testing.assert_close(block[norm], want, rtol=1e-9, atol=1e-12)
            assert int(block[f"{norm}.count"]) == N_WINDOWS * SEQLEN
            explicit.append(want)
    pooled = pooled_residual_cov(collected["store"], collected["refs"]["residual_cov"])
    torch.testing.assert_close(pooled, torch.stack(explicit).mean(0), rtol=1e-9, atol=1e-12)


def test_block_io_matches_explicit(collected, captured):
    for i, block in enumerate(collected["blocks"]["block_io"]):
        x, y = (torch.cat([t[k] for t in captured[(i, "io")]]).reshape(-1, 64).double() for k in (0, 1))
        cos = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
        assert block["cos"].dim() == 0 and int(block["count"]) == N_WINDOWS * SEQLEN
        torch.testing.assert_close(block["cos"], cos.mean(), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(block["influence"], 1 - cos.mean(), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(block["norm_in"], x.norm(dim=-1).mean(), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(block["norm_out"], y.norm(dim=-1).mean(), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(block["norm_update"], (y - x).norm(dim=-1).mean(), rtol=1e-6, atol=1e-9)


def test_gradients_match_full_model_autograd(collected, tiny_model, windows):
    model = load_model(tiny_model)
    signed: dict[str, torch.Tensor] = {}
    squared: dict[str, torch.Tensor] = {}
    for w in windows:  # per-window loss, batch 1: g_b
        model.zero_grad()
        logits = model(input_ids=w.unsqueeze(0), use_cache=False).logits
        F.cross_entropy(logits[0, :-1], w[1:]).backward()
        for i, layer in enumerate(model.model.layers):
            for name, lin in decoder_linears(layer).items():
                g = lin.weight.grad.double()
                signed[f"{i}.{name}"] = signed.get(f"{i}.{name}", 0) + g
                squared[f"{i}.{name}"] = squared.get(f"{i}.{name}", 0) + g * g
    for i, block in enumerate(collected["blocks"]["gradients"]):
        assert len(block) == 2 * 7
        for name in decoder_linears(model.model.layers[i]):
            for got, want in ((block[f"{name}.abs_sum"], signed[f"{i}.{name}"].abs()),
                              (block[f"{name}.sq_sum"], squared[f"{i}.{name}"])):
                err = (got.double() - want).norm() / want.norm()
                assert err < 1e-4, (i, name, float(err))


def test_collectors_memoized_and_deterministic(collected, tiny_model, tmp_path, monkeypatch):
    store, calib = collected["store"], collected["calib"]

    def boom(*a, **k):
        raise AssertionError("memoized statistics must not touch the model")

    monkeypatch.setattr(stats_mod, "LayerStream", boom)
    monkeypatch.setattr(gradients_mod, "LayerStream", boom)
    again = collect(store, tiny_model, "tiny-fp", calib, HOOKED + ["gradients"], gradient_windows=N_WINDOWS)
    assert again == collected["refs"]
    # Asking for more gradient windows than exist reuses the all-windows result.
    assert collect_gradients(store, tiny_model, "tiny-fp", calib, n_windows=99) == collected["refs"]["gradients"]
    monkeypatch.undo()

    # A fresh store recomputes everything, byte for byte (same object hashes).
    fresh = LocalStore(tmp_path / "fresh")
    calib2 = CalibrationSet.get(store, calib).put(fresh)
    assert collect(fresh, tiny_model, "tiny-fp", calib2, HOOKED + ["gradients"], batch_size=2,
                   gradient_windows=N_WINDOWS) == collected["refs"]


def test_gradient_window_count_is_part_of_the_key(collected, tiny_model):
    store, calib = collected["store"], collected["calib"]
    one = collect_gradients(store, tiny_model, "tiny-fp", calib, n_windows=1)
    assert one.key != collected["refs"]["gradients"].key
    assert store.get_tensors_metadata(one.blocks[0])["n_windows"] == "1"
    with pytest.raises(ValueError, match="unknown statistics"):
        collect(store, tiny_model, "tiny-fp", calib, ["nope"])
