"""NoWag (normalized weight and activation guided compression): pruning (NoWag-P, with the Wanda and
magnitude baselines) and vector quantization (NoWag-VQ, weighted k-means), sharing NoWag's normalization."""
from __future__ import annotations

from .pruning import Magnitude, MagnitudeConfig, NoWagP, NoWagPConfig, PruneConfig, Wanda, WandaConfig
from .vq import NoWagVQ, NoWagVQConfig

__all__ = ["Magnitude", "MagnitudeConfig", "NoWagP", "NoWagPConfig", "NoWagVQ", "NoWagVQConfig", "PruneConfig",
           "Wanda", "WandaConfig"]
