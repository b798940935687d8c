"""GGD fits (moment matching against scipy's gennorm), the torch sampler, gg_init_, the per-layer table."""
import math

import numpy as np
import pytest
import torch

from squeezeflow.errors import BadInput
from squeezeflow.methods.gg import ggd

scipy_stats = pytest.importorskip("scipy.stats")


def test_rho_table_matches_closed_forms():
    assert ggd.rho(1.0)[0] == pytest.approx(2.0, rel=1e-12)
    assert ggd.rho(2.0)[0] == pytest.approx(math.pi / 2, rel=1e-12)
    assert ggd.rho(0.5)[0] == pytest.approx(10 / 3, rel=1e-12)
    assert ggd.NU_TABLE[0] == pytest.approx(0.1) and ggd.NU_TABLE[-1] == pytest.approx(3.0)
    assert np.all(np.diff(ggd.RHO_TABLE) < 0)   # monotone: the inversion is well defined


@pytest.mark.parametrize("nu", [0.5, 1.0, 2.0])
def test_fit_recovers_gennorm_shape_and_scale(nu):
    x = scipy_stats.gennorm.rvs(nu, scale=0.02, size=200_000, random_state=1)
    f = ggd.fit(torch.from_numpy(x))
    assert abs(f.shape - nu) < 0.02
    assert f.scale == pytest.approx(0.02, rel=0.03)
    assert f.numel == 200_000


@pytest.mark.parametrize("nu", [0.7, 1.5])
def test_torch_sampler_is_gennorm(nu):
    s = ggd.sample(nu, 0.05, (100_000,), torch.Generator().manual_seed(3)).numpy()
    assert scipy_stats.kstest(s, "gennorm", args=(nu, 0, 0.05)).pvalue > 0.01
    assert torch.equal(ggd.sample(nu, 0.05, (10,), torch.Generator().manual_seed(3)),
                       ggd.sample(nu, 0.05, (10,), torch.Generator().manual_seed(3)))


def test_fit_refuses_degenerate_input():
    with pytest.raises(BadInput, match="not all zeros"):
        ggd.fit(torch.zeros(10))
    with pytest.raises(BadInput, match="at least 2"):
        ggd.fit(torch.ones(1))


@pytest.mark.parametrize("shape,xi,fan", [(1.0, 2.0, "fan_in"), (0.6, 1.0, "fan_out"), (2.0, 2.0, "fan_in")])
def test_gg_init_matches_requested_shape_and_variance(shape, xi, fan):
    model = torch.nn.Sequential(torch.nn.Linear(384, 256), torch.nn.LayerNorm(256), torch.nn.Linear(256, 512))
    ggd.gg_init_(model, shape=shape, xi=xi, seed=0, fan=fan)
    for lin in (model[0], model[2]):
        n = lin.weight.shape[1] if fan == "fan_in" else lin.weight.shape[0]
        f = ggd.fit(lin.weight)
        assert abs(f.shape - shape) < 0.06
        assert f.std ** 2 == pytest.approx(xi / n, rel=0.03)
        assert torch.count_nonzero(lin.bias) == 0
    assert torch.equal(model[1].weight, torch.ones(256))
    again = ggd.gg_init_(torch.nn.Sequential(torch.nn.Linear(384, 256)), shape=shape, xi=xi, seed=0, fan=fan)
    assert torch.equal(again[0].weight, model[0].weight)   # seeded


def test_gg_init_refuses_bad_arguments():
    with pytest.raises(BadInput, match="fan"):
        ggd.gg_init_(torch.nn.Linear(4, 4), fan="fan_avg")
    with pytest.raises(BadInput, match="xi"):
        ggd.gg_init_(torch.nn.Linear(4, 4), xi=0.0)


def test_model_table_and_plot(tiny_model):
    rows = ggd.model_table(tiny_model)
    names = {r["name"] for r in rows}
    assert "model.layers.0.mlp.up_proj.weight" in names and "model.embed_tokens.weight" in names
    assert not any("norm" in n for n in names)
    assert all(0.1 <= r["shape"] <= 3.0 and r["scale"] > 0 for r in rows)
    md = ggd.table_markdown(rows)
    assert md.count("\n") == len(rows) + 2
    png = ggd.shape_plot(rows)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png == ggd.shape_plot(rows)
