"""Prefect tasks, one module per stage; each is a thin wrapper over squeezeflow.pipeline."""
