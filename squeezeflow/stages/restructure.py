"""Layer-removal stages: checkpointed selection rounds, then a shallower dense checkpoint; plus what a
chained recipe's manifest and report say about each step."""
from __future__ import annotations

import tempfile
from pathlib import Path

from pydantic import BaseModel

from .. import memo
from ..compute import device_of, stage_compute
from ..config import EvalSpec
from ..job import ModelInfo
from ..methods import RestructureContext, get_method
from ..models import load_config
from ..store import ArtifactStore, Ref


class StructureStep(BaseModel):
    """One layer-removal method applied: the model it produced (a plain HF directory in the store) and
    its record (removed layers, per-round selection history)."""

    model: ModelInfo
    ref: Ref
    record: dict

    def key_form(self) -> dict:
        return {"model": self.model.key_form(), "ref": self.ref.sha256, "record": self.record}

    def revived(self, store: ArtifactStore) -> "StructureStep":
        return self.model_copy(update={"model": self.model.revived(store)})


def _structure_key(model: ModelInfo, config, calib: Ref, rounds: bool = False) -> str:
    """Index key of a layer-removal step; with `rounds`, of its selection rounds, which ignore the settings
    only the finish step reads (TRSP's stage 2), so trsp-25 and trsp-25-no-stage2 share them."""
    exclude = set(get_method(config).finish_only_fields) if rounds else set()
    return memo.stage_key("restructure", {"model": model, "method": config.model_dump(mode="json", exclude=exclude),
                                          "calibration": calib, "rounds": rounds})


def _context(store: ArtifactStore, model: ModelInfo, calib: Ref) -> RestructureContext:
    from ..calibration import CalibrationSet

    def block_io() -> list[dict]:
        from ..stats import collect

        ref = collect(store, Path(model.path), model.fingerprint, calib, ["block_io"],
                      trust_remote_code=model.trust_remote_code, compute=model.compute)["block_io"]
        return [{k: float(v) for k, v in store.get_tensors(b).items()} for b in ref.blocks]

    return RestructureContext(windows=CalibrationSet.get(store, calib).windows, block_io=block_io,
                              device=device_of(stage_compute(model)))


def structure_round(store: ArtifactStore, model: ModelInfo, config, calib: Ref, k: int, state: dict) -> dict:
    """Round k of a layer-removal method (e.g. one greedy TRSP/SLEB selection), stored under its own key:
    a killed run finds rounds 0..k-1 there and resumes at round k."""
    key = f"{_structure_key(model, config, calib, rounds=True)}-round-{k}"
    ref = store.get_index(key)
    if ref is None:
        state = get_method(config).run_round(Path(model.path), k, state, _context(store, model, calib))
        ref = store.put_json(state, kind="structure-round")
        store.put_index(key, ref)
    return store.get_json(ref)


def restructure(store: ArtifactStore, model: ModelInfo, config, calib: Ref, round_fn=None) -> StructureStep:
    """Apply one layer-removal method to `model`: its rounds (each checkpointed; `round_fn` lets the flow
    run each as a Prefect task), then its finish step, which writes the shallower checkpoint."""
    method = get_method(config)
    key = _structure_key(model, config, calib)
    num_layers = load_config(Path(model.path), model.trust_remote_code).num_hidden_layers
    state = method.initial_state(num_layers)
    for k in range(method.rounds(num_layers)):
        state = (round_fn or structure_round)(store, model, config, calib, k, state)
    record: dict = {}

    def build(out: Path) -> None:
        record.update(method.finish(Path(model.path), out, state, _context(store, model, calib)))

    ref = memo.stored_dir(store, key + "-model", "pruned-model", build)
    if not record:  # the directory was stored by an earlier, interrupted run: its record is lost, rebuild it
        with tempfile.TemporaryDirectory() as tmp:
            build(Path(tmp) / "again")
    out = model.model_copy(update={"path": str(store.materialize(ref)), "fingerprint": ref.sha256, "tree": ref,
                                   "num_layers": num_layers - len(record["removed"])})
    return StructureStep(model=out, ref=ref, record={"method": config.method, **record})


def step_metrics(store: ArtifactStore, base: ModelInfo, step: StructureStep, spec: EvalSpec) -> dict:
    """Perplexity (and KL against `base`) of a layer-removal step's output, stored once per (model,
    protocol): a chained recipe's report shows what each step did."""
    from .evaluate import evaluate_path

    def compute() -> dict:
        m = evaluate_path(Path(step.model.path), base, spec, step.record["method"])
        return {"perplexity": m["perplexity"], "kl": m["kl"], "bits_per_weight": m["bits_per_weight"]}

    key = memo.stage_key("evaluate", {"model": step.model, "base": base, "eval": spec, "step": True})
    return memo.remembered(store, key, dict, compute)[0]


def chain_lineage(store: ArtifactStore, job, steps: list[StructureStep]) -> list[dict]:
    """The manifest's record of a chained recipe: every layer-removal step (config, removed layers, output
    fingerprint, its metrics when a weight method follows), then the weight method."""
    chain = []
    weighted = job.structural < len(job.recipe.methods)
    for config, step in zip(job.recipe.methods, steps):
        entry = {"method": config.method, "config": config.model_dump(mode="json"), "record": step.record,
                 "num_layers": step.model.num_layers, "model_sha256": step.ref.sha256}
        if weighted:
            entry["metrics"] = step_metrics(store, job.model, step, job.evaluation)
        chain.append(entry)
    if weighted:
        config = job.recipe.methods[job.structural]
        chain.append({"method": config.method, "config": config.model_dump(mode="json"),
                      "statistics_on": steps[-1].ref.sha256, "statistics": list(job.weight_statistics)})
    return chain


def chain_report(chain: list[dict], final: dict) -> str:
    """Markdown: what each step of a chained recipe did to perplexity."""
    splits = list(final["perplexity"])
    lines = ["", "## Steps", "", "| step | method | layers | " + " | ".join(f"ppl {s}" for s in splits) + " |",
             "|---" * (len(splits) + 3) + "|"]
    for i, c in enumerate(chain, 1):
        m = c.get("metrics") or (final if i == len(chain) else None)
        cells = [f"{m['perplexity'][s]:.3f}" if m else "–" for s in splits]
        removed = c.get("record", {}).get("removed")
        layers = f"{c['num_layers']} (removed {removed})" if removed is not None else "–"
        lines.append(f"| {i} | {c['method']} | {layers} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
