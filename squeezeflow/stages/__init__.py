"""The trunk's stages as plain functions `fn(store, **inputs) -> output`. Each takes and returns small
refs into the artifact store (never tensors or modules), so any caller — a plain loop, a Prefect task, a
cluster worker — can run it, and its output can be remembered as JSON under its inputs' key."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..job import ModelInfo
from ..stats import StatsRef
from ..store import Ref
from .assemble import assemble, publish
from .calibrate import calibrate, statistics
from .compress import compress_block, compress_sequential, transform
from .evaluate import evaluate
from .pack import pack, tune
from .restructure import StructureStep, restructure


@dataclass(frozen=True)
class StageFunction:
    fn: Callable[..., Any]
    output: Any              # the output's type: how its remembered JSON is read back
    version: str | None      # memo.STAGE_VERSIONS entry; None = never remembered (publish: always live)


STAGE_FUNCTIONS: dict[str, StageFunction] = {
    "calibrate": StageFunction(calibrate, Ref, "calibrate"),
    "statistics": StageFunction(statistics, dict[str, StatsRef], "statistics"),
    "restructure": StageFunction(restructure, StructureStep, "restructure"),
    "transform": StageFunction(transform, ModelInfo, "transform"),
    "compress-block": StageFunction(compress_block, Ref, "compress"),
    "compress-sequential": StageFunction(compress_sequential, list[Ref], "compress"),
    "pack": StageFunction(pack, Ref, "pack"),
    "tune": StageFunction(tune, Ref, "tune"),
    "evaluate": StageFunction(evaluate, Ref, "evaluate"),
    "assemble": StageFunction(assemble, Ref, "assemble"),
    "publish": StageFunction(publish, dict, None),
}
