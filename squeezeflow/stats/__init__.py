"""The statistics engine: collectors streamed block by block over the calibration windows.

`collect(...)` runs every requested collector in ONE streamed pass over the model (one decoder block in
memory at a time), stores each block's result in the artifact store, and memoizes the whole result under
a key built from (model fingerprint, calibration set hash, collector name + version). A later run with
the same inputs, in any process, gets the stored statistics back without touching the model.

Hook collectors (COLLECTORS): hdiag (diag XᵀX), xtx (full XᵀX), residual_cov (E[x xᵀ] at the norms),
block_io (block input/output similarity). "gradients" is not a hook collector (it needs a backward
pass): `collect` routes it to `gradients.collect_gradients`, on `gradient_windows` windows, or on n
windows when asked for as "gradients:<n>" (a recipe asks for the count it needs).
"""
from __future__ import annotations

import contextlib
import hashlib

import torch
from pydantic import BaseModel

from ..calibration import CalibrationSet
from ..models import LayerStream
from ..store import ArtifactStore, Ref, canonical_json
from .block_io import BlockIO
from .hdiag import HDiag
from .residual_cov import ResidualCov
from .xtx import XtX

COLLECTORS = {c.name: c for c in (HDiag, XtX, ResidualCov, BlockIO)}
GRADIENTS = "gradients"  # produced by gradients.collect_gradients, not by a hook collector


class StatsRef(BaseModel):
    """One collector's statistics: `blocks[i]` holds {linear name: tensor} for decoder block i."""

    collector: str
    key: str
    blocks: list[Ref]

    model_config = {"frozen": True}


def stats_key(collector: str, model_fingerprint: str, calib_sha256: str, version: str | None = None,
              params: dict | None = None) -> str:
    """`version` defaults to the registered collector's; `params` (settings that change the result, e.g.
    the gradients' window count) join the key only when given, so hook collectors' keys stay as they were."""
    spec = {"collector": collector, "version": version or COLLECTORS[collector].version,
            "model": model_fingerprint, "calibration": calib_sha256}
    if params:
        spec["params"] = params
    return "stats-" + hashlib.sha256(canonical_json(spec)).hexdigest()


def collect(store: ArtifactStore, model_path, model_fingerprint: str, calib: Ref, names: list[str],
            batch_size: int = 4, trust_remote_code: bool = False, gradient_windows: int = 8,
            compute=None) -> dict[str, StatsRef]:
    """`compute`: a resolved non-default ComputeSpec (device, dtype, statistics dtype) or None (cpu, fp32
    blocks, fp64 sums, as always). A non-default one joins the statistics' keys: it changes the numbers.
    The gradients collector still runs on CPU in fp32 whatever `compute` says."""
    gradient_names = [n for n in names if n == GRADIENTS or n.startswith(GRADIENTS + ":")]
    unknown = sorted(set(names) - set(COLLECTORS) - set(gradient_names))
    if unknown:
        raise ValueError(f"unknown statistics {unknown}; known: {sorted([*COLLECTORS, GRADIENTS, GRADIENTS + ':<n>'])}")
    out: dict[str, StatsRef] = {}
    for name in sorted(gradient_names):
        from .gradients import collect_gradients  # imports this module: load it only when needed

        n = gradient_windows if name == GRADIENTS else int(name.split(":", 1)[1])
        out[name] = collect_gradients(store, model_path, model_fingerprint, calib, n, trust_remote_code, batch_size)
    todo = []
    for name in sorted(set(names) - set(gradient_names)):
        key = stats_key(name, model_fingerprint, calib.sha256,
                        params=None if compute is None else {"compute": compute.key_form()})
        cached = store.get_index(key)
        if cached is not None:
            out[name] = StatsRef(**store.get_json(cached))
        else:
            todo.append((name, key))
    if not todo:
        return out

    from ..compute import DEFAULT, device_of, dtype_of, stats_dtype_of

    compute_ = compute or DEFAULT
    stream = LayerStream(model_path, trust_remote_code, device_of(compute_), dtype_of(compute_))
    windows = CalibrationSet.get(store, calib).windows
    options = {} if compute is None else {"dtype": stats_dtype_of(compute_)}
    collectors = {name: COLLECTORS[name](**options) for name, _ in todo}
    blocks: dict[str, list[Ref]] = {name: [] for name, _ in todo}
    with torch.no_grad():
        hidden = stream.embed(windows)
        for i in range(stream.num_layers):
            with stream.block(i) as layer:
                with contextlib.ExitStack() as attached:
                    for c in collectors.values():
                        attached.enter_context(c.attach(layer))
                    hidden = stream.forward_block(layer, hidden, batch_size)
                for name, c in collectors.items():
                    meta = c.metadata() if hasattr(c, "metadata") else None
                    blocks[name].append(store.put_tensors(c.result(), kind=f"stats/{name}", metadata=meta))
    for name, key in todo:
        ref = StatsRef(collector=name, key=key, blocks=blocks[name])
        store.put_index(key, store.put_json(ref.model_dump(), kind="stats-index"))
        out[name] = ref
    return out

