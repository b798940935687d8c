"""Hugging Face integration: load packed Squeezeflow checkpoints with ``from_pretrained``.

Importing this module registers the quantization method "squeezeflow" with transformers, so
``AutoModelForCausalLM.from_pretrained(path)`` loads a packed artifact whose config.json holds

    "quantization_config": {"quant_method": "squeezeflow", "format_version": 1,
                            "modules": {"model.layers.0.self_attn.q_proj":
                                        {"format": "intq", "bits": 4, "group_size": 64}, ...}}

Before the weights load, every listed ``nn.Linear`` is swapped for the module of its format (see
``squeezeflow.kernels.formats``); the checkpoint's ``<module>.<field>`` tensors then load straight
into that module's buffers. Modules not listed stay as they are and load their dense tensors.

Without squeezeflow, transformers only warns about the unknown quant_method, skips it, and fills every
packed linear with random values (the packed fields match no parameter name): a model that runs and
outputs garbage. So config.json also names, as its ``transformers_weights`` file, an index that does not
exist and whose name says what to do (``PLAIN_LOAD_GUARD``): a plain ``from_pretrained`` stops with
"Can't find a checkpoint index (.../Squeezeflow packed checkpoint - ...)". transformers reads that field
only after asking the quantizer to adjust the config, which is where ours drops it again. (transformers'
``save_pretrained`` never writes that field: a re-saved packed model is unguarded; pack.py writes it.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn
from transformers.quantizers import auto as hf_auto
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from squeezeflow.errors import BadInput
from squeezeflow.kernels import formats
from squeezeflow.moe import UnfusedExperts, unfuse_experts

QUANT_METHOD = "squeezeflow"
FORMAT_VERSION = 1
# A file name that is also the error message of a plain load: no such file exists in any artifact.
PLAIN_LOAD_GUARD = ("Squeezeflow packed checkpoint - load it after `import squeezeflow` (pip install squeezeflow), "
                    "or run `squeezeflow export` for a standard format - model.safetensors.index.json")


class SqueezeflowConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a packed checkpoint: format version + per-module format entries."""

    def __init__(
        self,
        modules: Mapping[str, Mapping[str, Any]] | None = None,
        format_version: int = FORMAT_VERSION,
        **kwargs: Any,
    ) -> None:
        # from_dict passes the whole JSON object back in, quant_method included.
        kwargs.pop("quant_method", None)
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.modules = {name: dict(entry) for name, entry in (modules or {}).items()}
        # Keep keys this reader does not use so that saving the model again writes them back.
        for key, value in kwargs.items():
            setattr(self, key, value)
        self.post_init()

    def post_init(self) -> None:
        """Refuse what this reader cannot load, before any weights are touched."""
        if self.format_version != FORMAT_VERSION:
            raise BadInput(
                f"packed checkpoint has format_version {self.format_version!r}, but this squeezeflow reads "
                f"format_version {FORMAT_VERSION}; upgrade squeezeflow or re-pack the model"
            )
        if not isinstance(self.modules, dict) or not self.modules:
            raise BadInput("quantization_config.modules must map module names to format entries and not be empty")
        for name, entry in self.modules.items():
            if "format" not in entry:
                raise BadInput(f"quantization_config.modules[{name!r}] has no 'format' key")
            try:
                formats.check_params(entry["format"], entry)
            except ValueError as exc:
                raise BadInput(f"quantization_config.modules[{name!r}]: {exc}") from None


def quantization_config(modules: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The ``quantization_config`` JSON object for config.json, validated."""
    return SqueezeflowConfig(modules=modules).to_dict()


class SqueezeflowHfQuantizer(HfQuantizer):
    """Loads pre-packed Squeezeflow checkpoints; it never quantizes on the fly."""

    # Packing happens in the squeezeflow pipeline; with this set, transformers refuses to use the
    # quantizer on a dense checkpoint (pre_quantized=False) instead of silently loading garbage.
    requires_calibration = True
    quantization_config: SqueezeflowConfig

    def update_attn_implementation(self, config: Any) -> Any:
        # The last hook that sees the model config before transformers resolves the weight files: drop
        # the guard that stops loaders without squeezeflow (see the module docstring).
        if getattr(config, "transformers_weights", None) == PLAIN_LOAD_GUARD:
            del config.transformers_weights
        return super().update_attn_implementation(config)

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        # An MoE's packed experts are per-expert linears: unfuse the skeleton's experts the way streaming did
        # (squeezeflow.moe) before the packed modules replace those linears.
        unfuse_experts(model)
        replace_modules(model, self.quantization_config.modules)

    def update_weight_conversions(self, weight_conversions, model):
        # The packed checkpoint already names tensors as the unfused skeleton does (`mlp.experts.3.gate_proj.
        # qweight`, `mlp.gate.weight`): transformers' converters that merge per-expert tensors into fused
        # experts would collect them for parameters the skeleton no longer has. Renamings stay.
        from transformers.core_model_loading import WeightConverter

        conversions = super().update_weight_conversions(weight_conversions, model)
        if not any(isinstance(m, UnfusedExperts) for m in model.modules()):
            return conversions
        return [c for c in conversions if not (isinstance(c, WeightConverter) and any(
            ".experts." in t or t.startswith("experts.") for t in c._original_target_patterns))]

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        # Every packed tensor is final as stored: nothing to quantize while loading.
        return False

    def is_serializable(self, **kwargs: Any) -> bool:
        # The module buffers are exactly the packed fields, so save_pretrained writes the same format.
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def replace_modules(model: nn.Module, modules: Mapping[str, Mapping[str, Any]]) -> None:
    """Swap each listed ``nn.Linear`` of ``model`` for an empty module of its packed format.

    The new module takes the device (meta during ``from_pretrained``) and dtype of the weight it
    replaces, so nothing is allocated until the checkpoint tensors arrive.
    """
    tied = _tied_module_names(model)
    for name, entry in modules.items():
        path = _resolve(model, name)
        if path in tied:
            raise BadInput(
                f"{name} shares its weight with another module (tied embeddings) and cannot be packed; "
                "leave it dense or untie it before packing"
            )
        linear = model.get_submodule(path)
        if not isinstance(linear, nn.Linear):
            raise BadInput(f"{name} is a {type(linear).__name__}, but packed formats replace nn.Linear only")
        new_module = formats.make_module(
            entry["format"],
            entry,
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            dtype=linear.weight.dtype,
            device=linear.weight.device,
        )
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path), child, new_module)


def _resolve(model: nn.Module, name: str) -> str:
    """Module path of ``name`` inside ``model``.

    Names in the config are relative to the task model (``model.layers.0...`` for a CausalLM); a
    bare base model loaded from the same checkpoint lacks the ``base_model_prefix`` part.
    """
    candidates = [name]
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and name.startswith(prefix + "."):
        candidates.append(name[len(prefix) + 1 :])
    for path in candidates:
        try:
            model.get_submodule(path)
        except AttributeError:
            continue
        return path
    raise BadInput(f"quantization_config names module {name!r}, which {type(model).__name__} does not have")


def _tied_module_names(model: nn.Module) -> set[str]:
    tied: Mapping[str, str] = getattr(model, "all_tied_weights_keys", None) or {}
    names = set(tied) | set(tied.values())
    return {key.rpartition(".")[0] for key in names}


def register() -> None:
    """Register the config and quantizer with transformers; safe to call any number of times.

    transformers' register_* helpers refuse a name that is already taken, so an earlier
    registration of ours (a second import, ``importlib.reload``) is removed first and the current
    classes take its place. A different library's "squeezeflow" registration is left alone.
    """
    for mapping, cls in (
        (hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, SqueezeflowConfig),
        (hf_auto.AUTO_QUANTIZER_MAPPING, SqueezeflowHfQuantizer),
    ):
        existing = mapping.get(QUANT_METHOD)
        if existing is not None and existing is not cls and not _same_class(existing, cls):
            raise RuntimeError(
                f"transformers already has a {QUANT_METHOD!r} quantization method from "
                f"{existing.__module__}.{existing.__qualname__}; it conflicts with squeezeflow's"
            )
        mapping.pop(QUANT_METHOD, None)
    hf_auto.register_quantization_config(QUANT_METHOD)(SqueezeflowConfig)
    hf_auto.register_quantizer(QUANT_METHOD)(SqueezeflowHfQuantizer)


def _same_class(a: type, b: type) -> bool:
    return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


register()
