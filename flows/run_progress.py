"""A flow run's progress as a Prefect progress artifact (the percentage bar on the flow run's Artifacts tab).

The plan's stages are weighed roughly by their wall time; the bar moves inside compress and evaluate
(per block, per window) from the stages' reports, and jumps at the other stages' ends.
"""
from __future__ import annotations

from prefect import get_client, get_run_logger
from prefect.artifacts import create_progress_artifact

from squeezeflow.progress import RunProgress

# Rough wall-time weights of each kind of stage on the tiny and the real model: compression dominates,
# then the statistics pass and the evaluations.
WEIGHTS = {"calibrate": 1.0, "statistics": 2.0, "evaluate": 2.0, "compress": 6.0, "pack": 1.0, "publish": 0.5}


def weighted_labels(stages) -> list[tuple[str, float]]:
    """[(label, weight)] of a plan's stages in run order, one entry per label (a recipe's per-block
    compress stages share one)."""
    out: dict[str, float] = {}
    for st in stages:
        out.setdefault(st.label, WEIGHTS.get(st.label.split()[0], 1.0))
    return list(out.items())


class _FlowProgress(RunProgress):
    def stage_started(self, stage) -> None:
        self.stage(stage.label)


def flow_progress(key: str, stages, description: str) -> RunProgress:
    """A RunProgress over the plan's stages, mirrored to a new progress artifact.

    If the artifact cannot be created (API hiccup) the run goes on without it: progress is a view."""
    labels = weighted_labels(stages)
    try:
        artifact_id = create_progress_artifact(progress=0.0, key=key, description=description)
    except Exception as e:  # noqa: BLE001
        get_run_logger().warning("no progress artifact: %s", e)
        return _FlowProgress(labels)

    def sink(percent: float) -> None:
        from prefect.client.schemas.actions import ArtifactUpdate

        with get_client(sync_client=True) as client:
            client.update_artifact(artifact_id=artifact_id, artifact=ArtifactUpdate(data=percent))

    return _FlowProgress(labels, sink)
