"""A Dask nanny that sets environment variables *before* its worker process starts.

The nanny's own `env=` option is applied inside the worker process after it has imported squeezeflow,
hence torch: too late for torch's thread pool (OMP_NUM_THREADS) and unsafe for CUDA_VISIBLE_DEVICES.
Dask's pre-spawn environment is set before the process starts, but it is one global config for every
nanny; this subclass makes it per worker (each local GPU worker sees only its own device).

Imported by SpecCluster from its dotted name (squeezeflow.runners builds the spec), so only when Dask runs.
"""
from __future__ import annotations

from distributed import Nanny


class PreSpawnNanny(Nanny):
    def __init__(self, *args, pre_spawn_env: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        # Nanny.pre_spawn_env: what os.environ gets just before the worker process is spawned.
        ours = {k: str(v) for k, v in (pre_spawn_env or {}).items()}
        self.pre_spawn_env.update(ours)
        # Nanny.env: what the worker process sets in os.environ once started. Nanny.__init__ built it from
        # Dask's own pre-spawn defaults (OMP_NUM_THREADS=1): left so, it put 1 back before torch's thread
        # pool first read it, and every worker computed single-threaded.
        self.env.update(ours)
