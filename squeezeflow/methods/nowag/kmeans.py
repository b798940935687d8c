"""Weighted k-means in plain PyTorch, for vector quantization of weight matrices (NoWag-VQ).

Points ``x`` [N, d] carry per-coordinate weights, and the distance to a centroid ``c`` is

    D(x, c) = Σ_l w_l (x_l − c_l)²  =  Σ w x²  −  2 (w ⊙ x) · c  +  w · (c ⊙ c)

The weights are not free per point: points come in *groups* that share one weight vector (for a weight
matrix cut into subvectors of d consecutive inputs, all subvectors of column block b share
w_b = h[b·d:(b+1)·d]). So the weights are given as ``weights`` [G, d] plus ``groups`` [N] (each point's
row of ``weights``). With A = [w ⊙ x, w] [N, 2d] and B = [−2c, c ⊙ c] [K, 2d] the last two terms are one
matmul A·Bᵀ; the first does not depend on c, so it never enters an argmin.

Algorithm (deterministic: the same input and seed give bit-identical output):

* If there are at most K distinct points, the distinct points are the centroids: lossless, 0 iterations.
* Seeding: k-means++ (textbook D² sampling: the next centroid is point x with probability ∝ D(x), its
  weighted squared distance to the nearest centroid chosen so far), or the NoWag code's variant
  ∝ min(D(x), 1) ("kmeans++-clip"), driven by a ``torch.Generator`` seeded with ``seed``. The exact
  distribution is sampled lazily: proposals come from the min-distances of the last refresh (an upper
  bound, since they only shrink), and each is accepted with probability D_now(x) / D_then(x) after
  checking it against the centroids chosen since; every so often all min-distances are refreshed with
  one matmul against those new centroids. This is rejection sampling, so the chosen centroids follow
  D² sampling exactly, at the cost of a few matmuls instead of K passes over all points.
* Lloyd: assign every point to its nearest centroid (first index on ties), move each centroid to the
  weighted mean of its points per coordinate (Σ w x / Σ w; a coordinate with zero total weight, e.g.
  an empty cluster, keeps its old value), at most ``max_iter`` times; stop early when no assignment
  changes. The assignment step after a centroid update is pruned, exactly: every point keeps a lower
  bound on its distance to every centroid but its own (Hamerly), and the centroids' moves are known
  (per group, since the triangle inequality holds in each group's weighted norm). The m centroids
  that moved farthest are measured exactly against all points (a cheap amin, no argmin); the other
  moves only lower the bounds; a point gets a full search over all K centroids only when a measured
  centroid is now nearer, or its own centroid is no longer provably nearest. m is picked per
  iteration by the predicted cost, and a plain Lloyd step runs when nothing is cheaper (the first
  iterations, when every centroid moves). In late iterations few centroids move and an iteration
  costs a small fraction of a full pass. Result: the plain Lloyd result (bit-identical in tests),
  up to float rounding at near-ties.
* The distance matrix is computed a chunk of points at a time (``chunk_bytes``, 4 MiB by default).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

# Distance-matrix chunk: [chunk, K] fp32 of about this size, small enough to stay in cache between the
# matmul that writes it and the reductions that read it (measured best at 2-4 MiB on one core).
CHUNK_BYTES = 4 << 20
_MIN_ROWS = 16               # pad tiny matmuls: BLAS picks another kernel (other rounding) below this
_ARGMIN_GROUP = 64           # two-level argmin: amin over groups of 64 centroids, then inside the best
_ZERO_REL = 2e-6             # seeding: distances below this × Σ w x² are fp32 noise of the expansion
INITS = ("kmeans++", "kmeans++-clip")


@dataclass
class KMeansResult:
    centroids: torch.Tensor     # [K, d] fp32
    assignments: torch.Tensor   # [N] int64, nearest centroid of each point (for these centroids)
    iterations: int             # Lloyd iterations run (centroid updates)
    converged: bool             # stopped because no assignment changed (or lossless)
    lossless: bool              # at most K distinct points: the centroids are the points themselves


def matrix_subvectors(w: torch.Tensor, h: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut w [out, in] into subvectors of d consecutive inputs of a row, row-major: point i·nb + b is
    w[i, b·d:(b+1)·d] with nb = ceil(in / d). The input dim is padded to nb·d with each row's mean and
    importance 0 (padding never counts in a distance). Returns (points [out·nb, d] fp32,
    weights [nb, d] fp32 with weights[b] = h[b·d:(b+1)·d], groups [out·nb] int64 = point index mod nb)."""
    w = w.float()
    out_f, in_f = w.shape
    if h.shape != (in_f,):
        raise ValueError(f"importance must have shape ({in_f},), got {tuple(h.shape)}")
    nb = -(-in_f // d)
    pad = nb * d - in_f
    if pad:
        w = torch.cat([w, w.mean(1, keepdim=True).expand(out_f, pad)], 1)
        h = torch.cat([h.float(), h.new_zeros(pad, dtype=torch.float32)])
    points = w.reshape(out_f * nb, d).contiguous()
    weights = h.float().reshape(nb, d).contiguous()
    groups = torch.arange(nb, dtype=torch.int64, device=w.device).repeat(out_f)
    return points, weights, groups


def objective(points: torch.Tensor, weights: torch.Tensor, groups: torch.Tensor, centroids: torch.Tensor,
              assignments: torch.Tensor) -> float:
    """Σ_x Σ_l w_l (x_l − c_{a(x), l})², in float64."""
    diff = points.double() - centroids.double()[assignments]
    return float((diff.square() * weights.double()[groups]).sum())


class _Problem:
    """The point set in the forms the distance computations use."""

    def __init__(self, points: torch.Tensor, weights: torch.Tensor, groups: torch.Tensor, chunk_bytes: int):
        self.x = points
        self.weights = weights
        self.groups = groups
        w = weights[groups]
        wx = w * points
        self.a = torch.cat([wx, w], 1).contiguous()         # [N, 2d]: rows of the distance matmul
        self.sq = (wx * points).sum(1)                       # [N]: Σ w x², the constant term
        self.wx64 = wx.double()                              # centroid update numerators
        self.chunk_bytes = chunk_bytes
        self.device = points.device
        self._scratch = torch.empty(0, device=self.device)

    def scratch(self, rows: int, cols: int) -> torch.Tensor:
        """A reused [rows, cols] fp32 buffer for distance chunks: a fresh allocation of this size would
        be a fresh mmap, and its page faults cost more than the matmul writing into it."""
        if self._scratch.numel() < rows * cols:
            self._scratch = torch.empty(rows * cols, device=self.device)
        return self._scratch[:rows * cols].view(rows, cols)

    @staticmethod
    def b_t(c: torch.Tensor) -> torch.Tensor:
        return torch.cat([-2.0 * c, c * c], 1).t().contiguous()   # [2d, K]

    def chunk_rows(self, k: int) -> int:
        return max(_MIN_ROWS, self.chunk_bytes // (4 * k))

    def nearest(self, c: torch.Tensor, rows: torch.Tensor | None = None,
                second: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Nearest centroid of each point (first index on ties) and its squared distance, plus the
        squared distance to the second-nearest centroid when asked; for the points `rows` (default
        all). Each point's numbers do not depend on which other points share its chunk."""
        a = self.a if rows is None else self.a[rows]
        sq = self.sq if rows is None else self.sq[rows]
        n, k = a.shape[0], c.shape[0]
        bt = self.b_t(c)
        idx = torch.empty(n, dtype=torch.int64, device=self.device)
        d1 = torch.empty(n, device=self.device)
        d2 = torch.empty(n, device=self.device) if second else None
        step = self.chunk_rows(k)
        buf = self.scratch(max(_MIN_ROWS, min(step, n)), k)
        two_level = k % _ARGMIN_GROUP == 0 and k >= 2 * _ARGMIN_GROUP
        for s in range(0, n, step):
            ac = a[s:s + step]
            m = ac.shape[0]
            if m < _MIN_ROWS:
                ac = torch.cat([ac, ac.new_zeros(_MIN_ROWS - m, ac.shape[1])])
            sc = torch.mm(ac, bt, out=buf[:ac.shape[0]])[:m]
            r = torch.arange(m, device=self.device)
            if two_level:
                # The min of each group of 64 (a fast vectorized amin), the first group holding the
                # overall min, the first index of it inside that group: the same result as sc.min(1).
                s3 = sc.view(m, k // _ARGMIN_GROUP, _ARGMIN_GROUP)
                gmin = s3.amin(2)
                _, g = gmin.min(1)
                inner = s3[r, g]
                v, j = inner.min(1)
                i = g * _ARGMIN_GROUP + j
                if second:
                    inner[r, j] = math.inf
                    gmin[r, g] = math.inf
                    v2 = torch.minimum(inner.amin(1), gmin.amin(1))
            else:
                v, i = sc.min(1)
                if second:
                    if k > 1:
                        sc[r, i] = math.inf
                        v2 = sc.amin(1)
                    else:
                        v2 = torch.full((m,), math.inf, device=self.device)
            idx[s:s + m] = i
            d1[s:s + m] = (v + sq[s:s + m]).clamp_(min=0)
            if second:
                d2[s:s + m] = (v2 + sq[s:s + m]).clamp_(min=0)
        return idx, d1, d2

    def nearest_of(self, c: torch.Tensor, exclude: torch.Tensor) -> torch.Tensor:
        """Squared distance from every point to the nearest of the centroids c [m, d], skipping column
        exclude[n] for point n (-1: none). Only the distance: an amin is far cheaper than an argmin."""
        n, m = self.a.shape[0], c.shape[0]
        bt = self.b_t(c)
        out = torch.empty(n, device=self.device)
        step = self.chunk_rows(m)
        buf = self.scratch(max(_MIN_ROWS, min(step, n)), m)
        for s in range(0, n, step):
            ac = self.a[s:s + step]
            rows = ac.shape[0]
            if rows < _MIN_ROWS:
                ac = torch.cat([ac, ac.new_zeros(_MIN_ROWS - rows, ac.shape[1])])
            sc = torch.mm(ac, bt, out=buf[:ac.shape[0]])[:rows]
            e = exclude[s:s + rows]
            own = (e >= 0).nonzero().squeeze(1)
            sc[own, e[own]] = math.inf
            out[s:s + rows] = (sc.amin(1) + self.sq[s:s + rows]).clamp_(min=0)
        return out

    def exact_dist(self, c: torch.Tensor) -> torch.Tensor:
        """Σ w (x − c)² of every point to its own centroid c [N, d], by the direct formula."""
        d = self.x.shape[1]
        return ((self.x - c).square_() * self.a[:, d:]).sum(1)

    def update(self, assign: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """Weighted mean per coordinate of each cluster; zero total weight keeps the old coordinate."""
        k, g = old.shape[0], self.weights.shape[0]
        counts = torch.bincount(assign * g + self.groups, minlength=k * g).view(k, g).double()
        sw = counts @ self.weights.double()                                   # [K, d]
        swx = torch.zeros(k, old.shape[1], dtype=torch.float64, device=self.device).index_add_(0, assign, self.wx64)
        return torch.where(sw > 0, swx / sw.clamp(min=1e-300), old.double()).float()


class _Uniforms:
    """A deterministic stream of U[0, 1) floats from a seeded torch.Generator, drawn in batches."""

    def __init__(self, gen: torch.Generator):
        self.gen = gen
        self.buf: list[float] = []

    def __call__(self) -> float:
        if not self.buf:
            # Drawn on the host generator's device whatever the compute device: the same stream everywhere.
            self.buf = torch.rand(4096, generator=self.gen, dtype=torch.float64, device="cpu").tolist()[::-1]
        return self.buf.pop()


def _kmeanspp(p: _Problem, k: int, clip: bool, gen: torch.Generator) -> torch.Tensor:
    """Indices of k seed points by (lazily evaluated, exact) D² sampling; see the module docstring."""
    n = p.x.shape[0]
    uniform = _Uniforms(gen)
    # The acceptance test below is sequential, one proposal at a time: it reads the proposal's row from a
    # host mirror taken once here (no copy on a CPU run) rather than syncing with the device per proposal.
    # The refreshes of the min-distances, the heavy part, run on the points' device.
    a_np, sq_np, x_host = p.a.cpu().numpy(), p.sq.cpu().numpy(), p.x.cpu()
    first = min(int(uniform() * n), n - 1)
    chosen = [first]
    pending = [first]                   # chosen since the last refresh of the min-distances
    mind = torch.full((n,), math.inf, device=p.device)  # min-distance to the centroids chosen before the refresh
    thr = p.sq * _ZERO_REL
    b_pending = np.zeros((0, p.a.shape[1]), dtype=np.float32)
    prob_np = cs = None
    total = 0.0
    misses = 0                          # rejections in a row: many mean the proposals went stale
    while len(chosen) < k:
        if len(pending) >= max(1, min(512, len(chosen) // 2)) or cs is None or misses >= 32:
            c = p.x[pending]
            bt = p.b_t(c)
            step = max(_MIN_ROWS, p.chunk_bytes // (4 * len(pending)))
            for s in range(0, n, step):
                dist = torch.mm(p.a[s:s + step], bt).amin(1).add_(p.sq[s:s + step]).clamp_(min=0)
                dist[dist <= thr[s:s + step]] = 0.0
                torch.minimum(mind[s:s + step], dist, out=mind[s:s + step])
            mind[chosen] = 0.0
            pending = []
            misses = 0
            b_pending = np.zeros((0, p.a.shape[1]), dtype=np.float32)
            prob = mind.clamp(max=1.0) if clip else mind
            # cumsum + searchsorted on a host copy, once per refresh: the sampling between refreshes is a
            # sequential loop of scalar look-ups, which a device would answer one sync at a time.
            prob_np = prob.cpu().numpy().copy()
            cs = np.cumsum(prob_np, dtype=np.float64)
            total = float(cs[-1])
            if not total > 0:
                break
        r1, r2 = uniform(), uniform()
        i = min(int(np.searchsorted(cs, r1 * total, side="right")), n - 1)
        stale = float(prob_np[i])
        if stale <= 0:
            misses += 1
            continue
        now = stale
        if len(pending):
            dist = float((a_np[i] @ b_pending.T).min()) + float(sq_np[i])
            if dist <= float(sq_np[i]) * _ZERO_REL:
                dist = 0.0
            now = min(stale, min(dist, 1.0) if clip else dist)
        if not r2 * stale < now:
            misses += 1
        else:
            misses = 0
            chosen.append(i)
            pending.append(i)
            prob_np[i] = 0.0
            c = x_host[i:i + 1]
            b_pending = np.concatenate([b_pending, p.b_t(c).t().numpy()])
    if len(chosen) < k:
        # Every remaining point is at weighted distance 0 from a centroid (they differ only where the
        # weights are 0): any of them will do; take them in a seeded random order.
        taken = set(chosen)
        # The host generator draws on the host (a CPU generator cannot draw on a device): same order everywhere.
        for i in torch.randperm(n, generator=gen, device="cpu").tolist():
            if len(chosen) == k:
                break
            if i not in taken:
                chosen.append(i)
        while len(chosen) < k:
            chosen.append(chosen[len(chosen) % n])
    return torch.tensor(chosen, dtype=torch.int64, device=p.device)


def _distinct(points: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(distinct points, inverse index) when there are at most k distinct points, else None."""
    x = points + 0.0                       # -0.0 -> +0.0, so bit patterns agree with float equality
    if x.shape[0] > k:
        # Cheap pre-check: more than k distinct row hashes means more than k distinct rows.
        bits = x.view(torch.int32).to(torch.int64)
        mult = torch.tensor([(0x9E3779B97F4A7C15 >> (3 * j)) & 0x7FFFFFFFFFFF | 1 for j in range(x.shape[1])],
                            dtype=torch.int64, device=x.device)
        hashes = (bits * mult).sum(1)
        if torch.unique(hashes).numel() > k:
            return None
    uniq, inverse = torch.unique(x, dim=0, return_inverse=True)
    if uniq.shape[0] > k:
        return None
    return uniq, inverse


def weighted_kmeans(points: torch.Tensor, k: int, weights: torch.Tensor | None = None,
                    groups: torch.Tensor | None = None, max_iter: int = 100, init: str = "kmeans++",
                    seed: int = 0, chunk_bytes: int = CHUNK_BYTES,
                    snap: Callable[[torch.Tensor], torch.Tensor] | None = None) -> KMeansResult:
    """Weighted k-means of points [N, d] with weights[groups[n]] [d] as point n's coordinate weights.

    `weights` [G, d] (default: one group of ones), `groups` [N] int64 into it (default: all 0).
    `snap`, if given, maps the final centroids to the values they will be stored as (e.g. rounding to
    fp16); the result then holds the snapped centroids and every point's nearest snapped centroid."""
    if points.dim() != 2 or not points.dtype.is_floating_point:
        raise ValueError(f"points must be a 2-D float tensor [N, d], got {points.dtype} {tuple(points.shape)}")
    n, d = points.shape
    if n == 0 or d == 0:
        raise ValueError("points must not be empty")
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    points = points.detach().float().contiguous()
    if not torch.isfinite(points).all():
        raise ValueError("points contain NaN or inf")
    device = points.device              # everything heavy lives where the points are
    if weights is None:
        weights = torch.ones(1, d, device=device)
    weights = weights.detach().to(device, torch.float32).reshape(-1, d).contiguous()
    if groups is None:
        if weights.shape[0] != 1:
            raise ValueError("groups is required when there is more than one weight vector")
        groups = torch.zeros(n, dtype=torch.int64, device=device)
    groups = groups.to(device, torch.int64)
    if groups.shape != (n,) or int(groups.min()) < 0 or int(groups.max()) >= weights.shape[0]:
        raise ValueError(f"groups must be [N] = [{n}] indices into the {weights.shape[0]} weight vectors")
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise ValueError("weights must be finite and non-negative")

    found = _distinct(points, k)
    if found is not None:
        uniq, inverse = found
        centroids = torch.zeros(k, d, device=device)
        centroids[:uniq.shape[0]] = uniq
        if snap is not None:
            centroids = snap(centroids).float()
            inverse = nearest_centroids(points, centroids, weights, groups, chunk_bytes)
        return KMeansResult(centroids, inverse.to(torch.int64), 0, True, True)

    p = _Problem(points, weights, groups, chunk_bytes)
    gen = torch.Generator().manual_seed(int(seed))   # a host generator: the same seeding on every device
    c = points[_kmeanspp(p, k, init == "kmeans++-clip", gen)].clone()
    assign, _, d2 = p.nearest(c, second=True)
    lower = d2.sqrt_()                      # ≤ distance from each point to its nearest other centroid

    def move(old: torch.Tensor, new: torch.Tensor) -> int:
        """Reassign every point to its nearest centroid after the centroids moved from `old` to `new`;
        returns how many assignments changed. See the module docstring."""
        nonlocal assign, lower
        drift = ((new - old).square() @ p.weights.t()).sqrt_()     # [K, G]: move of each centroid, per group
        lead = drift.amax(1)
        movers = (lead > 0).nonzero().squeeze(1)
        movers = movers[lead[movers].argsort(descending=True, stable=True)]
        n_movers = movers.numel()
        # tail[m]: per group, the farthest move of the movers from the m-th on (all of them: tail[0]).
        tail = torch.zeros(n_movers + 1, drift.shape[1], device=device)
        if n_movers:
            tail[:n_movers] = drift[movers].flip(0).cummax(0).values.flip(0)
        upper_sq = p.exact_dist(new[assign])
        upper = upper_sq.sqrt()
        n = upper.numel()
        # Measure the m farthest movers exactly (cost n·m); the others lower every bound by their
        # farthest move, and the points whose bound then fails get a full search (cost K each). Pick m
        # by that cost; a plain Lloyd step (n·K) when nothing is cheaper.
        best_cost, best_m, lower_rest = n * k, -1, lower
        for m in sorted({0, n_movers, *(64 << i for i in range(12))}):
            if m > n_movers or n * m >= best_cost:
                continue
            rest = lower - tail[m][p.groups]
            cost = n * m + int((upper > rest).sum()) * k
            if cost < best_cost:
                best_cost, best_m, lower_rest = cost, m, rest
        if best_m < 0:
            idx, _, d2 = p.nearest(new, second=True)
            changed = int((idx != assign).sum())
            assign, lower = idx, d2.sqrt_()
            return changed
        movers = movers[:best_m]
        lower = lower_rest.clone()
        if best_m:
            slot = torch.full((k,), -1, dtype=torch.int64, device=device)
            slot[movers] = torch.arange(best_m, device=device)
            b1 = p.nearest_of(new[movers], slot[assign])
            lower = torch.minimum(b1.sqrt(), lower)
            switch = b1 < upper_sq
        else:
            switch = torch.zeros(n, dtype=torch.bool, device=device)
        # Full search where a measured mover is nearer now, or an unmeasured centroid may be.
        rows = (switch | (upper > lower)).nonzero().squeeze(1)
        changed = 0
        if rows.numel():
            idx, _, d2 = p.nearest(new, rows, second=True)
            changed = int((idx != assign[rows]).sum())
            assign[rows] = idx
            lower[rows] = d2.sqrt_()
        return changed

    iterations, converged = 0, False
    while iterations < max_iter:
        iterations += 1
        new = p.update(assign, c)
        changed = move(c, new)
        c = new
        if changed == 0:
            converged = True
            break
    if snap is not None:
        new = snap(c).float()
        move(c, new)
        c = new
    return KMeansResult(c, assign, iterations, converged, False)


def nearest_centroids(points: torch.Tensor, centroids: torch.Tensor, weights: torch.Tensor,
                      groups: torch.Tensor, chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """Index of each point's nearest centroid under its group's weights (first index on ties)."""
    device = points.device
    p = _Problem(points.detach().float().contiguous(),
                 weights.detach().to(device, torch.float32).reshape(-1, points.shape[1]),
                 groups.to(device, torch.int64), chunk_bytes)
    return p.nearest(centroids.to(device, torch.float32))[0]
