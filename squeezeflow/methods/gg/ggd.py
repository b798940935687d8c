"""Generalized-Gaussian (GGD) fits of weight tensors, and GG initialisation.

Density f(x) = ν / (2βΓ(1/ν)) · exp(−(|x|/β)^ν): ν = 2 is Gaussian, ν = 1 Laplace; Var = β²Γ(3/ν)/Γ(1/ν).

The shape is fitted by moment matching (research notes §B.1, as BackSlash and DeepShape do): the sample
ratio ρ̂ = E[θ²] / E[|θ|]² equals ρ(ν) = Γ(1/ν)Γ(3/ν) / Γ(2/ν)², which decreases monotonically in ν, so ν
is read off a table of ρ over ν ∈ [0.1, 3.0] (step 0.01). We interpolate linearly between the two
nearest entries instead of taking the nearest one, which removes the table's ±0.005 quantization.
The scale follows from the second moment: σ = sqrt(E[θ²]) (not mean-centred: weights are centred at 0
by construction), β = σ · sqrt(Γ(1/ν)/Γ(3/ν)). Shapes outside [0.1, 3.0] are clamped to the ends.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ...errors import BadInput

NU_MIN, NU_MAX, NU_STEP = 0.1, 3.0, 0.01
NU_TABLE = np.round(np.arange(NU_MIN, NU_MAX + NU_STEP / 2, NU_STEP), 2)


def rho(nu: float | np.ndarray) -> np.ndarray:
    """ρ(ν) = Γ(1/ν)Γ(3/ν)/Γ(2/ν)², through log-gamma (Γ(1/0.1) is already 3.6e5; logs stay finite)."""
    from math import lgamma

    nus = np.atleast_1d(np.asarray(nu, dtype=np.float64))
    return np.array([math.exp(lgamma(1 / v) + lgamma(3 / v) - 2 * lgamma(2 / v)) for v in nus])


RHO_TABLE = rho(NU_TABLE)  # decreasing: ρ(0.1) ≈ 1.9e4 … ρ(2) = π/2 … ρ(3) ≈ 1.39


def shape_from_rho(rho_hat: float) -> float:
    """ν with ρ(ν) = rho_hat, by linear interpolation in the table (np.interp wants increasing x)."""
    return float(np.interp(rho_hat, RHO_TABLE[::-1], NU_TABLE[::-1]))


def scale_from_std(std: float, nu: float) -> float:
    """β of a zero-mean GGD with shape ν and standard deviation `std`."""
    return std * math.exp(0.5 * (math.lgamma(1 / nu) - math.lgamma(3 / nu)))


@dataclass(frozen=True)
class GGDFit:
    shape: float   # ν
    scale: float   # β
    std: float     # sqrt(E[θ²])
    numel: int


def fit(t: torch.Tensor) -> GGDFit:
    """Moment-matching GGD fit of all the entries of `t` (fp64 sums)."""
    x = t.detach().reshape(-1).double()
    if x.numel() < 2:
        raise BadInput(f"a GGD fit needs at least 2 values, got {x.numel()}")
    m2 = float((x * x).mean())
    m1 = float(x.abs().mean())
    if m1 == 0.0:
        raise BadInput("a GGD fit needs a tensor that is not all zeros")
    nu = shape_from_rho(m2 / (m1 * m1))
    std = math.sqrt(m2)
    return GGDFit(shape=nu, scale=scale_from_std(std, nu), std=std, numel=x.numel())


def sample(shape: float, scale: float, size: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
    """GGD(0, β, ν) samples in torch: sign · β · G^(1/ν) with G ~ Gamma(1/ν, 1) (notes §B.7), fp64."""
    if not NU_MIN <= shape <= 10.0 or scale <= 0:
        raise BadInput(f"GGD shape must be in [{NU_MIN}, 10] and scale positive, got shape {shape}, scale {scale}")
    n = math.prod(size)
    # torch's Gamma sampler takes no generator: draw it through the standard-gamma of a seeded numpy
    # stream derived from the torch generator, so a seed gives the same tensor everywhere.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device="cpu").item())  # host generator, host draw
    rng = np.random.default_rng(seed)
    g = rng.standard_gamma(1.0 / shape, size=n)
    signs = rng.integers(0, 2, size=n) * 2 - 1
    return torch.from_numpy(signs * scale * g ** (1.0 / shape)).reshape(size)


# ------------------------------------------------------------------------------------------------
# GG initialisation (notes §B.3)
# ------------------------------------------------------------------------------------------------
def gg_init_(model: torch.nn.Module, shape: float = 2.0, xi: float = 2.0, seed: int = 0,
             fan: str = "fan_in") -> torch.nn.Module:
    """Initialise every 2-D weight of `model` in place from a zero-mean GGD of shape `shape` and variance
    ξ / fan, and every other parameter as a fresh model would (norm weights 1, biases 0).

    `fan` = "fan_in" (default: the input features of nn.Linear, i.e. weight.shape[1], the usual He
    convention) or "fan_out" (weight.shape[0], what the released gg_init.py uses for every 2-D parameter:
    out_features of a Linear, the vocabulary size of an embedding). ξ = 2 for ReLU-like, 1 for linear.
    """
    if fan not in ("fan_in", "fan_out"):
        raise BadInput(f"gg_init_: fan must be 'fan_in' or 'fan_out', got {fan!r}")
    if xi <= 0:
        raise BadInput(f"gg_init_: xi must be positive, got {xi}")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                n = p.shape[1] if fan == "fan_in" else p.shape[0]
                std = math.sqrt(xi / n)
                p.copy_(sample(shape, scale_from_std(std, shape), tuple(p.shape), gen).to(p.device, p.dtype))
            elif name.endswith("bias"):
                p.zero_()
            elif name.endswith("weight"):
                p.fill_(1.0)
    return model


# ------------------------------------------------------------------------------------------------
# Per-layer table and plot for a checkpoint
# ------------------------------------------------------------------------------------------------
def model_table(path: Path) -> list[dict]:
    """One row per 2-D tensor of a safetensors checkpoint directory: name, shape ν, scale β, std, numel
    (in name order; embeddings included, norms and biases are not matrices and are skipped)."""
    from safetensors import safe_open

    rows = []
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise BadInput(f"no *.safetensors files in {path}")
    for f in files:
        with safe_open(f, "pt") as st:
            for k in sorted(st.keys()):
                t = st.get_tensor(k)
                if t.dim() == 2 and t.is_floating_point():
                    rows.append({"name": k, **asdict(fit(t))})
    return rows


def table_markdown(rows: list[dict]) -> str:
    lines = ["| tensor | shape ν | scale β | std | numel |", "|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['shape']:.3f} | {r['scale']:.4g} | {r['std']:.4g} | {r['numel']} |" for r in rows]
    return "\n".join(lines) + "\n"


def shape_plot(rows: list[dict]) -> bytes:
    """PNG: fitted shape ν per decoder layer, one line per linear kind (deterministic bytes)."""
    from ...evaluation.plots import _figure, _png

    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4))
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        parts = r["name"].split(".")
        if len(parts) > 3 and parts[1] == "layers":
            series.setdefault(".".join(parts[3:-1]), []).append((int(parts[2]), r["shape"]))
    for kind, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=kind)
    ax.axhline(2.0, color="grey", ls="--", lw=0.8, label="Gaussian (ν = 2)")
    ax.axhline(1.0, color="grey", ls=":", lw=0.8, label="Laplace (ν = 1)")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("fitted GGD shape ν")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _png(fig)

