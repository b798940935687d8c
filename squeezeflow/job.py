"""Preflight: everything a run needs is checked before any heavy work, and frozen into a `Job` — the
resolved model, the recipe as it will really run, the calibration and evaluation specs with the content
hash of their text, and what the recipe's methods need. `dag.plan(job)` turns a Job into stages.
"""
from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, model_serializer

from .architectures import check_recipe as check_architecture_recipe
from .config import CalibrationSpec, ComputeSpec, EvalSpec, ModelRef
from .errors import BadInput
from .methods import LayerRemoval, TransformsModel, TunesPacked, WeightMethod, get_method
from .models import LayerStream, decoder_linears, load_config, resolve_model
from .recipes import Recipe, load_recipe
from .registry import check_name as check_registry_name
from .shards import DEFAULT_MAX_SHARD_BYTES, parse_size
from .store import ArtifactStore, Ref

# diag(XᵀX) is always collected: RTN does not need it, but every report shows each layer's
# activation-weighted output error, which is the number that predicts perplexity damage.
BASE_STATISTICS = ("hdiag",)


class ModelInfo(BaseModel):
    """A resolved model. The fingerprint, not the path, identifies it in cache keys and lineage."""

    ref: str
    name: str
    path: str
    fingerprint: str
    num_layers: int
    trust_remote_code: bool = False
    # A model the trunk derived (transformed, layers removed) lives in the store; `path` is where it was
    # materialized, which a later process re-materializes from `tree` (scratch may have been cleaned).
    tree: Ref | None = None
    # The resolved compute setting every stage reading this model runs with (compute.py); None is the
    # default (cpu, fp32), left out of the key and the dump so default runs keep their keys.
    compute: ComputeSpec | None = None

    model_config = {"frozen": True}

    def key_form(self) -> dict:
        """What identifies this model in a cache key: everything but where it happens to lie on disk (and
        which GPU computes with it: only the kind of device and the precisions change results)."""
        form = self.model_dump(mode="json", exclude={"path", "tree", "compute"})
        if self.compute is not None:
            form["compute"] = self.compute.key_form()
        return form

    @model_serializer(mode="wrap")
    def _without_default_compute(self, handler):
        data = handler(self)  # a default run's remembered JSON (any nesting) stays as it was
        if self.compute is None and isinstance(data, dict):
            data.pop("compute", None)
        return data

    def revived(self, store: ArtifactStore) -> "ModelInfo":
        return self if self.tree is None else self.model_copy(update={"path": str(store.materialize(self.tree))})


class Job(BaseModel):
    """A validated request: one model, one recipe, its calibration and evaluation."""

    model: ModelInfo
    recipe: Recipe
    calibration: CalibrationSpec
    evaluation: EvalSpec
    # sha256 of the calibration text and of each evaluation split: sources are keyed by content, not path.
    calibration_sha256: str
    evaluation_sha256: dict[str, str]
    statistics: tuple[str, ...]        # collected on the dense model before compression
    structural: int = 0                # leading layer-removal methods
    weight_statistics: tuple[str, ...] = ()  # after layer removal: collected on the shallower model
    layers_after: int                  # decoder blocks left once the layer-removal methods ran
    max_shard_size: int = DEFAULT_MAX_SHARD_BYTES  # the packed checkpoint's shards (shards.py)

    def key_form(self) -> dict:
        # A non-default compute is in the model's key form (it rides on ModelInfo to every stage).
        return {"model": self.model.key_form(), "recipe": self.recipe.model_dump(mode="json"),
                "calibration": self.calibration.model_dump(mode="json"), "calibration_sha256": self.calibration_sha256,
                "evaluation": self.evaluation.model_dump(mode="json"), "evaluation_sha256": self.evaluation_sha256,
                **({"max_shard_size": self.max_shard_size} if self.max_shard_size != DEFAULT_MAX_SHARD_BYTES else {})}

    @property
    def compute(self) -> ComputeSpec:
        """The resolved compute setting (device, dtype, statistics dtype) the job's stages run with."""
        from .compute import stage_compute

        return stage_compute(self.model)

    def on(self, compute: ComputeSpec) -> "Job":
        """The same job planned with another compute setting (a GPU pod's, from a machine without one)."""
        return self.model_copy(update={"model": self.model.model_copy(update={"compute": compute})})

    @property
    def weight_recipe(self) -> Recipe | None:
        """The recipe's weight method alone (what compress, pack and tune run), or None for removal only."""
        if self.structural == len(self.recipe.methods):
            return None
        return self.recipe.model_copy(update={"methods": [self.recipe.methods[self.structural]]})

    @property
    def weight_method(self) -> WeightMethod | None:
        recipe = self.weight_recipe
        return None if recipe is None else get_method(recipe.methods[0])

    @property
    def sequential(self) -> bool:
        m = self.weight_method
        return m is not None and m.schedule == "sequential"

    @property
    def transforms(self) -> bool:
        return isinstance(self.weight_method, TransformsModel)

    @property
    def tunes(self) -> bool:
        m = self.weight_method
        return isinstance(m, TunesPacked) and m.tunes()


def target_linears(path: Path, trust_remote_code: bool = False) -> dict[str, tuple[int, int]]:
    """{qualified name: (out, in)} for every linear in every decoder block, from a meta skeleton."""
    stream = LayerStream(path, trust_remote_code)
    return {f"model.layers.{i}.{n}": (m.out_features, m.in_features)
            for i, layer in enumerate(stream.inner.layers) for n, m in decoder_linears(layer).items()}


def structural_count(recipe: Recipe) -> int:
    """How many layer-removal methods lead the recipe; BadInput unless they all come before one weight method."""
    kinds = [isinstance(get_method(m), LayerRemoval) for m in recipe.methods]
    n = kinds.index(False) if False in kinds else len(kinds)
    if any(kinds[n:]):
        raise BadInput(f"recipe {recipe.name!r}: structural methods (layer removal) must come before the weight "
                       f"method; got {[m.method for m in recipe.methods]}")
    if len(kinds) - n > 1:
        raise BadInput(f"recipe {recipe.name!r} lists {len(kinds) - n} weight methods; a recipe runs at most one, "
                       f"after any structural ones")
    return n


def preflight(model: ModelRef, recipe: str | Recipe, calibration: CalibrationSpec, evaluation: EvalSpec,
              compute: ComputeSpec | None = None, max_shard_size: int | str | None = None) -> Job:
    """Validate a request into a Job, or refuse it (BadInput, one line) before any work: the model's layout,
    the recipe's fit to it, the sources, and whether its stages fit in memory (memory_plan.py)."""
    from . import memory_plan

    job = validate(model, recipe, calibration, evaluation, compute, max_shard_size)
    memory_plan.check(job, load_config(Path(job.model.path), job.model.trust_remote_code))
    return job


def validate(model: ModelRef, recipe: str | Recipe, calibration: CalibrationSpec, evaluation: EvalSpec,
             compute: ComputeSpec | None, max_shard_size: int | str | None = None) -> Job:
    """The preflight's checks but the memory plan's: for a job planned for another machine (pod_plan.py)."""
    from .calibration import check_activation_memory, load_text
    from .compute import carried, resolve
    from .malloc import release_freed_memory

    resolved_compute = resolve(compute)  # CUDA asked for where there is none: one line, before any work
    shard_bytes = DEFAULT_MAX_SHARD_BYTES if max_shard_size is None else parse_size(max_shard_size)
    release_freed_memory()  # every run starts here: make the streamed stages' freed blocks leave RSS
    recipe = load_recipe(recipe) if isinstance(recipe, str) else recipe
    n_struct = structural_count(recipe)
    resolved = resolve_model(model.ref)
    # The registry keys artifacts by model and recipe name: refuse names it cannot hold now, not at publish.
    check_registry_name("model", resolved.name)
    check_registry_name("recipe", recipe.name)
    config = load_config(resolved.path, model.trust_remote_code)
    if getattr(config, "quantization_config", None):
        raise BadInput(f"model {model.ref!r} is already compressed; compress its base model instead")
    max_pos = getattr(config, "max_position_embeddings", None)
    for what, seqlen in (("calibration", calibration.seqlen), ("evaluation", evaluation.seqlen)):
        if max_pos and seqlen > max_pos:
            raise BadInput(f"{what} seqlen {seqlen} exceeds the model's maximum of {max_pos} positions")
    check_activation_memory(calibration.n_samples, calibration.seqlen, config.hidden_size)
    linears = target_linears(resolved.path, model.trust_remote_code)  # an unstreamable layout is refused here
    check_architecture_recipe(config, recipe)
    layers_left = config.num_hidden_layers
    for step in recipe.methods[:n_struct]:
        layers_left = get_method(step).check_layers(layers_left)
    calib_sha = load_text(calibration.source).sha256  # readable and non-empty, or a BadInput naming it
    eval_sha = {split: load_text(split, "evaluation source").sha256 for split in evaluation.splits}
    info = ModelInfo(ref=model.ref, name=resolved.name, path=str(resolved.path), fingerprint=resolved.fingerprint,
                     num_layers=config.num_hidden_layers, trust_remote_code=model.trust_remote_code,
                     compute=carried(resolved_compute))
    common = dict(model=info, calibration=calibration, evaluation=evaluation, calibration_sha256=calib_sha,
                  evaluation_sha256=eval_sha, structural=n_struct, layers_after=layers_left,
                  max_shard_size=shard_bytes)
    if n_struct == len(recipe.methods):  # layer removal only: the artifact is the shallower dense model
        return Job(recipe=recipe, statistics=(), **common)
    method = get_method(recipe.methods[n_struct])
    method.check(linears)
    resolved_config = method.resolve(config)
    if resolved_config != recipe.methods[n_struct]:
        recipe = recipe.model_copy(update={"methods": [*recipe.methods[:n_struct], resolved_config]})
        method = get_method(resolved_config)
    # Per-block methods read statistics of the dense model (one statistics pass feeds them all);
    # sequential ones collect theirs on the fly, on activations through the already-compressed blocks.
    own = method.statistics if method.schedule == "per-block" else ()
    stats = tuple(sorted(set(BASE_STATISTICS) | set(own) | set(method.dense_statistics)))
    if n_struct:  # the weight method's statistics come from the restructured model, collected later
        return Job(recipe=recipe, statistics=(), weight_statistics=stats, **common)
    return Job(recipe=recipe, statistics=stats, **common)
