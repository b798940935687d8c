"""A flow run's progress as a Prefect progress artifact (the percentage bar on the flow run's Artifacts tab).

The stage plan below weighs the stages roughly by their wall time on the tiny and the real model
(compression dominates, then the two evaluations); the bar moves inside compress (per block) and evaluate
(per window) from the pipeline's reports, and jumps at the other stages' ends.
"""
from __future__ import annotations

from prefect import get_client, get_run_logger
from prefect.artifacts import create_progress_artifact

from squeezeflow.progress import RunProgress

SHARED_STAGES = (("calibrate", 1.0), ("saliency", 2.0), ("evaluate fp32", 2.0))


def recipe_stages(recipe: str) -> list[tuple[str, float]]:
    """The stages compress_recipe() runs for one recipe, with their weights."""
    return [(f"compress {recipe}", 6.0), (f"pack {recipe}", 1.0), (f"evaluate {recipe}", 2.0),
            (f"publish {recipe}", 0.5)]


def flow_progress(key: str, recipes: list[str], description: str) -> RunProgress:
    """A RunProgress over the shared stages and each recipe's, mirrored to a new progress artifact.

    If the artifact cannot be created (API hiccup) the run goes on without it: progress is a view."""
    stages = [*SHARED_STAGES, *(s for r in recipes for s in recipe_stages(r))]
    try:
        artifact_id = create_progress_artifact(progress=0.0, key=key, description=description)
    except Exception as e:  # noqa: BLE001
        get_run_logger().warning("no progress artifact: %s", e)
        return RunProgress(stages)

    def sink(percent: float) -> None:
        from prefect.client.schemas.actions import ArtifactUpdate

        with get_client(sync_client=True) as client:
            client.update_artifact(artifact_id=artifact_id, artifact=ArtifactUpdate(data=percent))

    return RunProgress(stages, sink)
