"""Where sequential activations live (squeezeflow/placement.py): the decision, with numbers."""
from __future__ import annotations

from squeezeflow import placement
from squeezeflow.placement import decide

MiB = 1 << 20


def test_activations_stay_on_the_device_when_twice_them_and_the_solve_fit():
    # 2 × 100 + 500 = 700 MiB against 1000 × 0.9 = 900 MiB: on the device.
    p = decide(100 * MiB, 500 * MiB, 1000 * MiB, cuda_available=True)
    assert p.on_device and not p.pin


def test_they_go_to_pinned_host_memory_when_they_do_not():
    # 2 × 250 + 500 = 1000 MiB > 900 MiB: host, pinned because CUDA is there.
    p = decide(250 * MiB, 500 * MiB, 1000 * MiB, cuda_available=True)
    assert not p.on_device and p.pin
    assert "pinned host memory" in p.describe("cuda:0")


def test_the_boundary_counts_inputs_and_outputs_and_the_headroom():
    free, peak = 1000 * MiB, 500 * MiB
    room = int(free * placement.HEADROOM) - peak  # what the two copies of the activations may take
    assert decide(room // 2, peak, free, True).on_device
    assert not decide(room // 2 + 1, peak, free, True).on_device
    assert decide(300 * MiB, 0, 1000 * MiB, True, headroom=0.6).on_device
    assert not decide(300 * MiB + 1, 0, 1000 * MiB, True, headroom=0.6).on_device


def test_no_pinning_without_cuda_and_nothing_to_decide_on_the_host():
    assert decide(10**12, 0, 1000, cuda_available=False).pin is False
    host = decide(10**12, 10**12, None, cuda_available=True)
    assert host.on_device and not host.pin  # a CPU job's activations are in host memory either way
    assert placement.plan("cpu", 8, 64, 64, 4, 0).on_device


def test_activation_bytes_and_the_solve_peak_from_the_memory_plan(tiny_model):
    from squeezeflow import memory_plan
    from squeezeflow.compute import DEFAULT
    from squeezeflow.methods import get_method
    from squeezeflow.models import load_config
    from squeezeflow.recipes import load_recipe

    assert placement.activation_bytes(128, 2048, 4096, 2) == 2 << 30  # 128 windows × 2048 × 4096 in bf16
    config = load_config(tiny_model)
    s = memory_plan.shapes(tiny_model, config)
    gptq = get_method(load_recipe("gptq-w3g32-act-mse").methods[0])
    rtn = get_method(load_recipe("rtn-w4g32").methods[0])
    peak = placement.solve_peak_bytes(tiny_model, config, DEFAULT, gptq)
    widest = max(s.linear_inputs)
    # One block's working copies, its XᵀX, the solver's copies of the widest input: more than the solve alone.
    assert peak > memory_plan.SOLVE_COPIES * widest * widest * 8
    assert placement.solve_peak_bytes(tiny_model, config, DEFAULT, rtn) < peak  # no XᵀX, no solve
