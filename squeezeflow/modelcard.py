"""The Hub-style README.md (model card) every artifact carries, and that `squeezeflow export` rewrites for
the format it writes.

YAML front matter the Hub reads (base_model, library_name, tags, pipeline_tag) plus a `quantization` block
(method, bits, format); then the recipe, the calibration data, the metrics against the base model and how
to load the folder. Everything comes from the artifact's own record (lineage, metrics, config.json), never
from the clock or the machine, so identical runs still give byte-identical artifacts.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

README = "README.md"
# What a reader fills in: the folder's path, or its Hub repo id once pushed.
WHERE = "path/to/this/folder"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def write_model_card(out: str | Path, lineage: Mapping[str, Any], metrics: Mapping[str, Any],
                     baseline: Mapping[str, Any]) -> Path:
    """Write README.md into the artifact directory `out` (which holds its config.json)."""
    out = Path(out)
    config = json.loads((out / "config.json").read_text())
    path = out / README
    path.write_text(model_card(config, lineage, metrics, baseline), encoding="utf-8")
    return path


def card_from_manifest(config: Mapping[str, Any], manifest: Mapping[str, Any], where: str = WHERE) -> str:
    """The card of an artifact described by its manifest, for the format `config` (its own, or an export's)."""
    return model_card(config, manifest["lineage"], manifest["metrics"], manifest["baseline"], where)


def model_card(config: Mapping[str, Any], lineage: Mapping[str, Any], metrics: Mapping[str, Any],
               baseline: Mapping[str, Any], where: str = WHERE) -> str:
    fmt = checkpoint_format(config)
    model, recipe = lineage["model"], lineage["recipe"]
    methods = [m for m in recipe.get("methods", []) if isinstance(m, Mapping)]
    front: dict[str, Any] = {}
    base = base_model_id(model)
    if base:
        front["base_model"] = base
        if metrics.get("quantized", fmt != "dense"):
            front["base_model_relation"] = "quantized"
    front["library_name"] = "transformers"
    front["pipeline_tag"] = "text-generation"
    front["tags"] = _tags(fmt, methods)
    front["quantization"] = _quantization(fmt, methods, metrics, config)
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# {model['name']} · {recipe.get('name', metrics.get('recipe', ''))}", "",
             f"Compressed with Squeezeflow from "
             f"`{base or model['name']}` (weights fingerprint `{str(model.get('fingerprint', ''))[:16]}`)"
             f". {_FORMAT_LINE[fmt]}", ""]
    lines += _how_to_load(fmt, where)
    lines += ["## Recipe", "", "```json", json.dumps(recipe, indent=2, sort_keys=True), "```", ""]
    lines += _calibration(lineage.get("calibration") or {})
    lines += _metrics_table(metrics, baseline)
    return "\n".join(lines).rstrip() + "\n"


def checkpoint_format(config: Mapping[str, Any]) -> str:
    """"squeezeflow" (native packed), "compressed-tensors" (an export) or "dense" (a plain checkpoint)."""
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method == "squeezeflow":
        return "squeezeflow"
    if method == "compressed-tensors":
        return "compressed-tensors"
    return "dense"


def base_model_id(model: Mapping[str, Any]) -> str | None:
    """The base model's Hub repo id when there is one: the origin of a catalog model (models.KNOWN_MODELS),
    or a reference that is itself a repo id. A local path means nothing on the Hub: None."""
    from .models import KNOWN_MODELS

    known = KNOWN_MODELS.get(str(model.get("ref"))) or KNOWN_MODELS.get(str(model.get("name")))
    if known:
        first = str(known.get("origin", "")).split(" ")[0]
        return first if _HUB_ID.fullmatch(first) else None
    ref = str(model.get("ref", ""))
    if _HUB_ID.fullmatch(ref) and not Path(ref).exists():
        return ref
    return None


_FORMAT_LINE = {
    "squeezeflow": "The weights are in Squeezeflow's packed format: load them with `squeezeflow` installed and "
                   "imported (a plain `from_pretrained` without it stops with an error that says so).",
    "compressed-tensors": "The weights are a standard compressed-tensors checkpoint (written by `squeezeflow "
                          "export`): transformers loads it with `compressed-tensors` installed, no Squeezeflow needed.",
    "dense": "The weights are an ordinary dense checkpoint: plain transformers loads it.",
}


def _tags(fmt: str, methods: list[Mapping[str, Any]]) -> list[str]:
    tags = ["squeezeflow"]
    for m in methods:
        if m.get("method"):
            tags.append(str(m["method"]))
        if isinstance(m.get("bits"), int):
            tags.append(f"{m['bits']}-bit")
    if fmt == "compressed-tensors":
        tags.append("compressed-tensors")
    if fmt != "dense":
        tags.append("quantized" if any("bits" in m for m in methods) else "sparse")
    return list(dict.fromkeys(tags))


def _quantization(fmt: str, methods: list[Mapping[str, Any]], metrics: Mapping[str, Any],
                  config: Mapping[str, Any]) -> dict[str, Any]:
    block: dict[str, Any] = {"method": "+".join(str(m.get("method")) for m in methods) or None}
    bits = sorted({m["bits"] for m in methods if isinstance(m.get("bits"), int)})
    if bits:
        block["bits"] = bits[0] if len(bits) == 1 else bits
    groups = sorted({m["group_size"] for m in methods if isinstance(m.get("group_size"), int)})
    if groups:
        block["group_size"] = groups[0] if len(groups) == 1 else groups
    if any(m.get("sym") for m in methods):
        block["symmetric"] = True
    if isinstance(metrics.get("bits_per_weight"), (int, float)):
        block["bits_per_weight"] = round(float(metrics["bits_per_weight"]), 3)
    if metrics.get("weight_sparsity"):
        block["weight_sparsity"] = round(float(metrics["weight_sparsity"]), 3)
    qc = config.get("quantization_config") or {}
    if fmt == "squeezeflow":
        block["format"] = "squeezeflow " + ", ".join(sorted({e["format"] for e in qc.get("modules", {}).values()}))
    elif fmt == "compressed-tensors":
        block["format"] = f"compressed-tensors {qc.get('format', '')}".strip()
    else:
        block["format"] = "dense"
    return block


def _how_to_load(fmt: str, where: str) -> list[str]:
    lines = ["## How to load", ""]
    if fmt == "squeezeflow":
        lines += ["```python", "import squeezeflow  # registers the \"squeezeflow\" quantization method with transformers",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'model = AutoModelForCausalLM.from_pretrained("{where}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{where}")', "```", "",
                  "`pip install squeezeflow` first. For runtimes without Squeezeflow, write a standard checkpoint: "
                  f"`squeezeflow export {where} --format compressed-tensors --dest OUT` (integer RTN/GPTQ weights; "
                  "pruned weights become a dense checkpoint).", ""]
    elif fmt == "compressed-tensors":
        lines += ["```python", "# pip install transformers compressed-tensors",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'model = AutoModelForCausalLM.from_pretrained("{where}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{where}")', "```", "",
                  f"vLLM reads the same folder (`vllm serve {where}`) for the 4- and 8-bit layouts it has kernels "
                  "for (symmetric: Marlin); this is on paper, not tested here.", ""]
    else:
        lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'model = AutoModelForCausalLM.from_pretrained("{where}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{where}")', "```", ""]
    return lines


def _calibration(calib: Mapping[str, Any]) -> list[str]:
    if not calib:
        return []
    text = f"{calib.get('n', '?')} windows × {calib.get('seqlen', '?')} tokens from `{calib.get('source', '?')}`"
    if calib.get("origin"):
        text += f" ({calib['origin']})"
    if calib.get("sampling"):
        text += f", {calib['sampling']}"
    text += f", seed {calib.get('seed', '?')}"
    if calib.get("text_sha256"):
        text += f"; text sha256 `{str(calib['text_sha256'])[:16]}…`"
    return ["## Calibration", "", text + ".", ""]


def _metrics_table(metrics: Mapping[str, Any], baseline: Mapping[str, Any]) -> list[str]:
    splits = sorted(set(baseline.get("perplexity") or {}) | set(metrics.get("perplexity") or {}))
    kl_splits = sorted(metrics.get("kl") or {})
    tasks = sorted(set(baseline.get("accuracy") or {}) | set(metrics.get("accuracy") or {}))
    head = (["model"] + [f"ppl {s}" for s in splits] + [f"KL {s}" for s in kl_splits] + [f"acc {t}" for t in tasks]
            + ["bits/weight", "sparsity", "size MiB"])
    lines = ["## Metrics", "", "Against the base model, as evaluated by Squeezeflow (lower perplexity and KL "
             "divergence from the base are better).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in (baseline, metrics):
        cells = [str(m.get("recipe", ""))]
        cells += [_num((m.get("perplexity") or {}).get(s)) for s in splits]
        cells += [_sig(((m.get("kl") or {}).get(s) or {}).get("kl")) for s in kl_splits]
        cells += [_num(_acc((m.get("accuracy") or {}).get(t))) for t in tasks]
        cells += [_num(m.get("bits_per_weight")), _num(m.get("weight_sparsity", 0.0)),
                  _num(m["size_bytes"] / 2**20, 1) if isinstance(m.get("size_bytes"), int) else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    protocol = (metrics.get("protocol") or {}).get("evaluation") or {}
    if protocol:
        lines += [""] + [f"- `{s}`: {p.get('windows')} windows × {p.get('seqlen')} tokens of a "
                         f"{p.get('corpus_tokens')}-token text (sha256 `{str(p.get('corpus_sha256', ''))[:16]}…`)" for s, p in sorted(protocol.items())]
    return lines + [""]


def _acc(value: Any) -> Any:
    if isinstance(value, Mapping):   # {"acc": 0.41, ...} or similar: the first number
        value = next((v for v in value.values() if isinstance(v, (int, float))), None)
    return value


def _num(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "–"
    return f"{value:.{digits}f}"


def _sig(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "–"
    return f"{value:.3g}"
