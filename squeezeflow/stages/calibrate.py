"""Calibration windows and the statistics pass over the dense model."""
from __future__ import annotations

from pathlib import Path

from ..config import CalibrationSpec
from ..job import ModelInfo
from ..models import load_tokenizer
from ..stats import StatsRef
from ..store import ArtifactStore, Ref


def calibrate(store: ArtifactStore, model: ModelInfo, spec: CalibrationSpec, text_sha256: str | None = None) -> Ref:
    """Sample calibration windows; the provenance (source hash, tokenizer, seed) rides in the metadata.
    `text_sha256` (from preflight) keys the stage by the text's content, not the source's name."""
    from ..calibration import build_calibration_set

    tokenizer = load_tokenizer(Path(model.path), model.trust_remote_code)
    calib = build_calibration_set(spec.source, tokenizer, spec.n_samples, spec.seqlen, spec.seed)
    if text_sha256 is not None and calib.provenance.get("text_sha256") not in (None, text_sha256):
        from ..errors import BadInput

        raise BadInput(f"calibration source {spec.source!r} changed while the run was starting; run it again")
    return calib.put(store)


def statistics(store: ArtifactStore, model: ModelInfo, calib: Ref, statistics: tuple[str, ...]) -> dict[str, StatsRef]:
    """Stream the model block by block and collect every statistic asked for, in one pass."""
    from ..stats import collect

    return collect(store, Path(model.path), model.fingerprint, calib, list(statistics),
                   trust_remote_code=model.trust_remote_code, compute=model.compute)
