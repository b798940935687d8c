"""Local GPU workers split the host's cores: cores ÷ workers intra-op threads each (squeezeflow/runners.py).
Started for real on CPU: a GPU worker's spec runs anywhere (CUDA_VISIBLE_DEVICES names a device that may not
exist; nothing here touches CUDA), so the threads each worker process ends up with are checked, not the spec."""
from __future__ import annotations

import pytest

from squeezeflow import runners


def test_gpu_worker_spec_splits_the_cores():
    workers = list(runners.local_cluster_spec(gpus=2, cores=8)["workers"].values())
    assert [w["options"]["pre_spawn_env"]["OMP_NUM_THREADS"] for w in workers] == ["4", "4"]
    assert all(w["options"]["nthreads"] == 1 for w in workers)  # one block task per GPU at a time
    three = list(runners.local_cluster_spec(gpus=3, cores=8)["workers"].values())
    assert {w["options"]["pre_spawn_env"]["MKL_NUM_THREADS"] for w in three} == {"2"}  # 8 // 3
    assert {w["options"]["pre_spawn_env"]["OMP_NUM_THREADS"]
            for w in runners.local_cluster_spec(gpus=4, cores=2)["workers"].values()} == {"1"}  # at least one
    # CPU workers keep the flow process's count: their blocks must stay byte-identical to the default runner's.
    cpu = runners.local_cluster_spec(gpus=0, cores=8)["workers"].values()
    assert {w["options"]["pre_spawn_env"]["OMP_NUM_THREADS"] for w in cpu} == {str(__import__("torch").get_num_threads())}


def test_started_gpu_workers_run_with_their_share_of_threads():
    pytest.importorskip("distributed")
    from distributed import Client, SpecCluster

    cluster = SpecCluster(**runners.local_cluster_spec(gpus=2, cores=4))
    client = Client(cluster)
    try:
        client.wait_for_workers(2, timeout=120)

        def threads() -> tuple[int, str]:
            import os

            import torch

            return torch.get_num_threads(), os.environ.get("CUDA_VISIBLE_DEVICES", "")

        got = client.run(threads)
        assert sorted(got.values()) == [(2, "0"), (2, "1")]
        resources = [w.get("resources") for w in client.scheduler_info(n_workers=-1)["workers"].values()]
        assert runners.block_resources(resources) == {runners.GPU: 1}
    finally:
        client.close()
        cluster.close()
