from squeezeflow import pipeline
from squeezeflow.config import CalibrationSpec
from squeezeflow.store import Ref, open_store

from ._stage import stage_task


@stage_task("calibrate")
def calibrate(store_uri: str, model: pipeline.ModelInfo, spec: CalibrationSpec) -> Ref:
    """Sample the calibration windows."""
    return pipeline.calibrate(open_store(store_uri), model, spec)
