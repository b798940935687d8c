"""A sequential method's calibration forward split across devices (stages/sequential_devices.py), exercised
on CPU with the device list ["cpu", "cpu"]: the same packed bytes as one device, the same hidden states, and
statistics whose fp64 sums differ by no more than summation order allows."""
from __future__ import annotations

from pathlib import Path

import torch

from squeezeflow import device_pool
from squeezeflow.config import CalibrationSpec, EvalSpec, ModelRef
from squeezeflow.stages.sequential_devices import forward_windows, merge, shards, splittable
from squeezeflow.store import LocalStore
from sf_testing import packed_sha256

# 8 windows = 2 batches of 4: two devices get one batch each (4 windows would be one batch, one shard).
CALIB = CalibrationSpec(n_samples=8, seqlen=64, seed=0)
EVAL = EvalSpec(seqlen=32, max_windows=2)
RECIPE = "gptq-w3g32-act-mse"


def test_shards_cut_at_batch_boundaries_in_window_order():
    assert shards(8, 2, 4) == [range(0, 4), range(4, 8)]
    assert shards(10, 2, 4) == [range(0, 8), range(8, 10)]  # 3 batches: the first device takes two
    assert shards(4, 3, 4) == [range(0, 4)]  # one batch: one shard, whatever the device count
    assert shards(12, 3, 4) == [range(0, 4), range(4, 8), range(8, 12)]
    assert shards(0, 2, 4) == [range(0, 0)]
    for n, d in ((17, 3), (9, 4), (128, 8)):
        parts = shards(n, d, 4)
        assert [i for r in parts for i in r] == list(range(n))
        assert all(r.start % 4 == 0 for r in parts)


def _job(model_path: Path):
    from squeezeflow import pipeline

    return pipeline.preflight(ModelRef(ref=str(model_path)), RECIPE, CALIB, EVAL)


def test_two_cpu_devices_pack_the_same_bytes_as_one(tiny_model, tmp_path):
    one = packed_sha256(LocalStore(tmp_path / "one"), tiny_model, RECIPE, CALIB, EVAL)
    with device_pool.spread_over(["cpu", "cpu"]):
        two = packed_sha256(LocalStore(tmp_path / "two"), tiny_model, RECIPE, CALIB, EVAL)
    assert two == one


def _split_and_stream(store, job, devices):
    from squeezeflow.calibration import CalibrationSet
    from squeezeflow.stages.calibrate import calibrate
    from squeezeflow.stages.compress import _split, _stream

    calib = calibrate(store, job.model, job.calibration)
    stream = _stream(job.model)
    with device_pool.spread_over(devices):
        split = _split(job.model, job.weight_method, stream, CalibrationSet.get(store, calib).windows, None)
    return split, stream


def test_the_split_shards_hidden_states_and_bounds_the_statistics(tiny_model, tmp_path):
    from squeezeflow.stats import COLLECTORS

    job = _job(tiny_model)
    store = LocalStore(tmp_path / "s")
    (one, _), (two, _) = (_split_and_stream(store, job, d) for d in (["cpu"], ["cpu", "cpu"]))
    assert [len(p.hidden) for p in one.parts] == [8] and [len(p.hidden) for p in two.parts] == [4, 4]
    assert two.parts[1].stream is not two.parts[0].stream  # the second device has its own copy of the block
    assert torch.equal(one.hidden(), two.hidden())
    results = []
    for split in (one, two):
        primary = split.parts[0].stream
        with torch.no_grad(), primary.block(0) as layer, split.block(0, layer) as layers:
            (xtx,) = split.collect(layers, lambda: [COLLECTORS["xtx"]()])
            split.forward(layers)
        results.append(xtx)
    assert results[0]._count == results[1]._count
    for name, s in results[0]._sums.items():
        other = results[1]._sums[name]
        # fp64 sums of the same products in another order: a few ulps of the largest entry at most.
        assert (s - other).abs().max() <= 1e-13 * s.abs().max(), name
    a, b = results[0].result(), results[1].result()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    # The propagated hidden states are the very same (same batches through the same block).
    assert torch.equal(one.hidden(), two.hidden())


def test_merge_adds_sums_and_counts_in_order():
    from squeezeflow.stats.hdiag import HDiag

    parts = [HDiag(), HDiag(), HDiag()]
    for k, c in enumerate(parts):
        c._sums, c._count = {"q": torch.full((2,), float(k + 1), dtype=torch.float64)}, {"q": 10 * (k + 1)}
    parts[2]._sums["o"], parts[2]._count["o"] = torch.ones(3, dtype=torch.float64), 5
    m = merge(parts)
    assert torch.equal(m._sums["q"], torch.full((2,), 6.0, dtype=torch.float64)) and m._count == {"q": 60, "o": 5}


def test_host_placed_forward_equals_the_streams_own(tiny_model):
    """The host-memory path (batches moved to the device, outputs back) runs the same batches as
    LayerStream.forward_block: on CPU the moves are no-ops and the outputs must be bitwise equal."""
    from squeezeflow.models import LayerStream

    stream = LayerStream(tiny_model)
    gen = torch.Generator().manual_seed(0)
    hidden = list(torch.randn(6, 1, 16, stream.config.hidden_size, generator=gen).unbind(0))
    with torch.no_grad(), stream.block(1) as layer:
        ref = stream.forward_block(layer, hidden, 4)
        got = forward_windows(stream, layer, hidden, stream.device, 4, pin=False)
    assert len(got) == 6 and all(torch.equal(a, b) for a, b in zip(ref, got))


def test_moe_models_and_unmergeable_collectors_stay_on_one_device(tiny_model, smollm_path, tmp_path):
    from sf_testing import make_tiny

    from squeezeflow.models import LayerStream
    from squeezeflow.stats import COLLECTORS

    dense = LayerStream(tiny_model).inner
    assert splittable(dense, [COLLECTORS["xtx"](), COLLECTORS["hdiag"]()])
    assert not splittable(dense, [COLLECTORS["xtx"](), COLLECTORS["block_io"]()])  # one count, no per-linear sums
    # Experts decide their fallback on the whole pass (moe.routed_statistics): never split.
    mixtral = LayerStream(make_tiny("mixtral", tmp_path / "mixtral", smollm_path)).inner
    assert not splittable(mixtral, [COLLECTORS["xtx"]()])
