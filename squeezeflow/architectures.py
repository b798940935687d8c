"""What block streaming must know about each decoder family so that embed -> blocks -> head is the model's own
forward, and what each family supports.

`LayerStream` (models.py) builds the model's meta skeleton and runs its own decoder blocks, norm and head; this
module supplies what lives in the model's top-level forward instead of in those modules, which differs by
family: the attention type of every layer (full or sliding window; each type has its own mask, made with
transformers' masking utils from the model's config), the rotary tables (one shared table, or one per layer
type as in Gemma3), the embedding scale (Gemma multiplies by √d) and the final logit soft-capping (Gemma2).
A family not in FAMILIES, an attention type we do not build masks for, bidirectional attention or routed
experts in a layout moe.py cannot unfuse are refused with one line: streaming them as a Llama would give
silently wrong statistics. Qwen2-MoE, Qwen3-MoE and Mixtral stream with one nn.Linear per expert projection.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

import torch

from .errors import BadInput

FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass(frozen=True)
class Family:
    name: str
    # Gemma2 multiplies the embeddings by √hidden in the model's forward; Gemma3 does it inside its embedding
    # module (which keeps the factor as `scalar_embed_scale`, read from the skeleton instead).
    embed_normalizer: bool = False


FAMILIES = {
    "llama": Family("Llama"),
    "mistral": Family("Mistral"),
    "qwen2": Family("Qwen2"),
    "qwen3": Family("Qwen3"),
    "gemma2": Family("Gemma2", embed_normalizer=True),
    "gemma3_text": Family("Gemma3"),
    "phi3": Family("Phi3"),
    # Mixture of experts: the skeleton's fused experts are unfused into per-expert linears (moe.py).
    "qwen2_moe": Family("Qwen2-MoE"),
    "qwen3_moe": Family("Qwen3-MoE"),
    "mixtral": Family("Mixtral"),
}


def family(config) -> Family:
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise BadInput(f"architecture {model_type!r} ({', '.join(getattr(config, 'architectures', None) or [])}) "
                       f"cannot be streamed block by block exactly; supported: "
                       f"{', '.join(sorted(f.name for f in FAMILIES.values()))}")
    return FAMILIES[model_type]


def layer_types(config) -> list[str]:
    """The attention type of every decoder layer, as the model's forward picks its mask."""
    n = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    if types:
        types = list(types)[:n]
    else:
        # Mistral / Phi3: one mask for every layer, sliding whenever the config has a window.
        window = getattr(config, "sliding_window", None)
        if getattr(config, "use_sliding_window", True) is False:
            window = None
        types = [SLIDING if window else FULL] * n
    unknown = sorted(set(types) - {FULL, SLIDING})
    if unknown:
        raise BadInput(f"attention type(s) {unknown} of {config.model_type!r} cannot be streamed exactly yet")
    if SLIDING in types and not getattr(config, "sliding_window", None):
        raise BadInput(f"{config.model_type!r} has sliding-window layers but no sliding_window size")
    return types


def check_layout(config, model) -> None:
    """Structural refusal (BadInput, one line) of a skeleton LayerStream cannot run as the model runs it."""
    fam = family(config)
    inner = getattr(model, "model", None)
    missing = [a for a in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(inner, a)]
    if inner is None or missing or model.get_output_embeddings() is None:
        raise BadInput(f"{fam.name} model without the decoder layout streaming needs (missing {missing or 'lm_head'})")
    if getattr(config, "use_bidirectional_attention", False):
        raise BadInput(f"{fam.name} with bidirectional attention cannot be streamed with causal masks")
    layer_types(config)
    for i, layer in enumerate(inner.layers):
        for name, p in layer.named_parameters():
            # Experts moe.py could not unfuse exactly (another fused layout): not plain linears.
            if p.dim() > 2:
                raise BadInput(f"{fam.name} layer {i} has a {p.dim()}-D parameter {name!r} (routed experts in a "
                               f"layout we cannot unfuse): supported mixture-of-experts families are "
                               f"Qwen2-MoE, Qwen3-MoE and Mixtral")


def check_recipe(config, recipe) -> None:
    """Refuse at preflight a recipe whose checkpoint rewrite does not know this family's block layout
    (each TransformsModel method says which layouts it rewrites: `refusal(model_config)`)."""
    from .methods import get_method
    from .methods.base import TransformsModel

    fam = family(config)
    for m in recipe.methods:
        method = get_method(m)
        why = method.refusal(config) if isinstance(method, TransformsModel) else None
        if why:
            raise BadInput(f"recipe {recipe.name!r}: {m.method} cannot rewrite this {fam.name} checkpoint: {why}")


def embed_scale(config, model) -> float | None:
    """The factor the model's forward applies to the token embeddings (Gemma: √hidden), or None."""
    scale = getattr(model.model.embed_tokens, "scalar_embed_scale", None)
    if scale is None and family(config).embed_normalizer:
        scale = config.hidden_size ** 0.5
    return None if scale in (None, 1.0) else float(scale)


def softcap_logits(config, logits: torch.Tensor) -> torch.Tensor:
    cap = getattr(config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


class BlockInputs:
    """Per-layer-type masks and rotary tables for full windows (no padding, no cache), as the model builds them."""

    def __init__(self, config, model, device: torch.device | str = "cpu"):
        self.config = config
        self.types = layer_types(config)
        # Rotary buffers are computed at init, not stored: build a real one from the model's own class.
        self.rotary = type(model.model.rotary_emb)(config=config).to(device)
        self.per_type_rotary = "layer_type" in inspect.signature(self.rotary.forward).parameters

    def mask(self, layer_type: str, hidden: torch.Tensor, position_ids: torch.Tensor):
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        make = create_sliding_window_causal_mask if layer_type == SLIDING else create_causal_mask
        return make(config=self.config, inputs_embeds=hidden, attention_mask=None, cache=None,
                    position_ids=position_ids)

    def kwargs(self, hidden: torch.Tensor, layer_index: int) -> dict:
        layer_type = self.types[layer_index]
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        rotary = (self.rotary(hidden, position_ids, layer_type) if self.per_type_rotary
                  else self.rotary(hidden, position_ids=position_ids))
        return {"attention_mask": self.mask(layer_type, hidden, position_ids), "position_ids": position_ids,
                "position_embeddings": rotary}


def block_layout(stream) -> dict:
    """The decoder layout `models check` reports: linears per block and the attention type of every layer."""
    from . import moe
    from .models import decoder_linears

    first = stream.inner.layers[0]
    experts = moe.layout(stream.model, stream.config)
    if experts:  # the first routed block shows the expert linears, once for all experts (`mlp.experts.*.…`)
        first = stream.inner.layers[experts["moe_layers"][0]]
    linears = {re.sub(r"\.experts\.\d+\.", ".experts.*.", n): [m.out_features, m.in_features, m.bias is not None]
               for n, m in decoder_linears(first).items()}
    return {"family": family(stream.config).name, "model_type": stream.config.model_type,
            "num_layers": stream.num_layers,
            "linears_per_block": linears, "experts": experts,
            "attention_types": layer_types(stream.config),
            "sliding_window": getattr(stream.config, "sliding_window", None),
            "tied_head": bool(getattr(stream.config, "tie_word_embeddings", False)),
            "embed_scale": embed_scale(stream.config, stream.model),
            "final_logit_softcapping": getattr(stream.config, "final_logit_softcapping", None)}
