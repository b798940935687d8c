"""Weighted k-means (squeezeflow.methods.nowag.kmeans): Lloyd fixed point, determinism, losslessness, weights,
chunking, exact D² seeding."""
import math

import pytest
import torch

from squeezeflow.methods.nowag import kmeans as km


def problem(out=128, inn=60, d=6, seed=0, skew=False):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=gen)
    h = torch.rand(inn, generator=gen) * 3
    if skew:
        h = h ** 6  # activation-like: a few inputs dominate
    return km.matrix_subvectors(w, h, d)


def distances(x, weights, groups, c):
    """Direct formula, float64: [N, K] weighted squared distances."""
    return ((x.double()[:, None, :] - c.double()[None]) ** 2 * weights.double()[groups][:, None, :]).sum(-1)


def weighted_means(x, weights, groups, assign, k, old):
    w = weights.double()[groups]
    sw = torch.zeros(k, x.shape[1], dtype=torch.float64).index_add_(0, assign, w)
    swx = torch.zeros(k, x.shape[1], dtype=torch.float64).index_add_(0, assign, w * x.double())
    return torch.where(sw > 0, swx / sw.clamp(min=1e-300), old.double())


def test_matrix_subvectors_pads_with_row_mean_and_zero_importance():
    w = torch.arange(2 * 8, dtype=torch.float32).view(2, 8)
    h = torch.arange(1, 9, dtype=torch.float32)
    x, weights, groups = km.matrix_subvectors(w, h, 3)
    assert x.shape == (6, 3) and weights.shape == (3, 3) and groups.tolist() == [0, 1, 2, 0, 1, 2]
    assert x[2].tolist() == [6.0, 7.0, w[0].mean().item()]
    assert x[5].tolist() == [14.0, 15.0, w[1].mean().item()]
    assert weights.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 0]]


@pytest.mark.parametrize("k,skew", [(64, False), (256, False), (256, True)])
def test_converges_to_a_lloyd_fixed_point(k, skew):
    x, weights, groups = problem(skew=skew)
    r = km.weighted_kmeans(x, k, weights, groups, max_iter=200)
    assert r.converged and not r.lossless and 1 <= r.iterations < 200
    d = distances(x, weights, groups, r.centroids)
    own = d.gather(1, r.assignments[:, None]).squeeze(1)
    # Every point sits at its nearest centroid (up to float rounding at near-ties) ...
    assert (own <= d.min(1).values * (1 + 1e-5) + 1e-12).all()
    # ... and every centroid is the weighted mean of its points: a fixed point of Lloyd's iteration.
    means = weighted_means(x, weights, groups, r.assignments, k, r.centroids)
    torch.testing.assert_close(r.centroids.double(), means, rtol=1e-5, atol=1e-6)


def test_objective_decreases_and_beats_random_codebooks():
    x, weights, groups = problem()
    k = 64
    one = km.weighted_kmeans(x, k, weights, groups, max_iter=1)
    full = km.weighted_kmeans(x, k, weights, groups, max_iter=100)
    obj = km.objective(x, weights, groups, full.centroids, full.assignments)
    assert obj < km.objective(x, weights, groups, one.centroids, one.assignments)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        rand_c = x[torch.randperm(x.shape[0], generator=gen)[:k]]
        rand_a = distances(x, weights, groups, rand_c).argmin(1)
        assert obj < 0.8 * km.objective(x, weights, groups, rand_c, rand_a)


@pytest.mark.parametrize("init", km.INITS)
def test_same_input_and_seed_give_bit_identical_output(init):
    x, weights, groups = problem(out=64, skew=True)
    a = km.weighted_kmeans(x, 64, weights, groups, init=init, seed=3)
    b = km.weighted_kmeans(x.clone(), 64, weights.clone(), groups.clone(), init=init, seed=3)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.assignments, b.assignments)
    assert a.iterations == b.iterations
    c = km.weighted_kmeans(x, 64, weights, groups, init=init, seed=4)
    assert not torch.equal(a.centroids, c.centroids)


def test_chunked_equals_unchunked():
    x, weights, groups = problem(out=64, skew=True)
    ref = km.weighted_kmeans(x, 128, weights, groups)
    for chunk_bytes in (1, 64 << 10, 1 << 30):     # 16 rows (the least), a few hundred, all at once
        r = km.weighted_kmeans(x, 128, weights, groups, chunk_bytes=chunk_bytes)
        assert torch.equal(r.centroids, ref.centroids) and torch.equal(r.assignments, ref.assignments)


@pytest.mark.parametrize("k", [20, 32])
def test_lossless_when_k_covers_the_distinct_points(k):
    gen = torch.Generator().manual_seed(0)
    distinct = torch.randn(20, 4, generator=gen)
    distinct[0] = 0.0
    x = distinct[torch.randint(0, 20, (500,), generator=gen)]
    x[::7] = -0.0  # -0.0 and 0.0 are one point
    r = km.weighted_kmeans(x, k, torch.rand(1, 4, generator=gen))
    assert r.lossless and r.converged and r.iterations == 0 and r.centroids.shape == (k, 4)
    assert torch.equal(r.centroids[r.assignments], x + 0.0)


def test_zero_weight_coordinate_is_ignored():
    x, weights, groups = problem(inn=48, d=4)
    weights[:, 2] = 0.0
    a = km.weighted_kmeans(x, 64, weights, groups)
    y = x.clone()
    y[:, 2] = torch.randn(x.shape[0], generator=torch.Generator().manual_seed(9)) * 100
    b = km.weighted_kmeans(y, 64, weights, groups)
    assert torch.equal(a.assignments, b.assignments)
    keep = [0, 1, 3]
    assert torch.equal(a.centroids[:, keep], b.centroids[:, keep])
    # A weight that is not zero does matter.
    weights[:, 2] = 1.0
    c = km.weighted_kmeans(y, 64, weights, groups)
    assert not torch.equal(a.assignments, c.assignments)


def test_snap_assigns_to_the_snapped_centroids():
    x, weights, groups = problem()
    r = km.weighted_kmeans(x, 64, weights, groups, snap=lambda c: c.half().float())
    assert torch.equal(r.centroids, r.centroids.half().float())
    d = distances(x, weights, groups, r.centroids)
    own = d.gather(1, r.assignments[:, None]).squeeze(1)
    assert (own <= d.min(1).values * (1 + 1e-5) + 1e-12).all()
    assert torch.equal(r.assignments, km.nearest_centroids(x, r.centroids, weights, groups))


def test_kmeanspp_samples_exactly_proportional_to_d():
    # 1-D points 0, 1, 3, 7: after the first seed, the second is drawn with probability D / ΣD.
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    p = km._Problem(x, torch.ones(1, 1), torch.zeros(4, dtype=torch.int64), km.CHUNK_BYTES)
    counts: dict[tuple[int, int], int] = {}
    trials = 4000
    for seed in range(trials):
        pair = tuple(km._kmeanspp(p, 2, False, torch.Generator().manual_seed(seed)).tolist())
        counts[pair] = counts.get(pair, 0) + 1
    for first in range(4):
        dist = [(float(x[j]) - float(x[first])) ** 2 for j in range(4)]
        for second in range(4):
            expect = trials / 4 * dist[second] / sum(dist)
            got = counts.get((first, second), 0)
            assert abs(got - expect) <= 4 * math.sqrt(expect + 1) + 2, (first, second, got, expect)


def test_bad_input_is_a_value_error():
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match="init"):
        km.weighted_kmeans(x, 4, init="random")
    with pytest.raises(ValueError, match="non-negative"):
        km.weighted_kmeans(x, 4, -torch.ones(1, 3))
    with pytest.raises(ValueError, match="NaN"):
        km.weighted_kmeans(x.masked_fill(x > 1, math.nan), 4)
