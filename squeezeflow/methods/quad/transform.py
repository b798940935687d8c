"""QUAD's function-preserving transform of a Llama-style checkpoint (QuaRot when r = 0): Llama, Mistral,
Qwen2 (q/k/v biases: on the output side, unchanged), Qwen3 (q_norm/k_norm, see HEAD_NORMS) and Phi3
(fused qkv_proj / gate_up_proj); Gemma2/3 and MoE families are refused at preflight (UNSUPPORTED_LAYOUTS).

1. Fuse every RMSNorm weight into the linears that read its output (q, k, v; gate, up; lm_head), so
   the norms become weightless; lm_head is untied from the embedding first. The embedding is NOT
   mean-centred (QuaRot's LayerNorm habit is not function-preserving for RMSNorm).
2. Expand the residual stream from d to d + r dimensions: x ↦ x·Q with Q = [P, I − PPᵀ] (d × (d + r)),
   P the top-r eigenvectors of the pooled residual covariance. Q Qᵀ = PPᵀ + (I − PPᵀ)² = I, so with
   M = Q·R (R orthogonal, below) every reader W ↦ W·M, writer W ↦ Mᵀ·W and the embedding E ↦ E·M
   compute exactly what they did: (x M)(W M)ᵀ = x Wᵀ, and ‖x M‖ = ‖x‖.
3. Rotate: R = diag(R_r, R_d) (outlier block, main block), each a randomized Hadamard where the order
   allows and seeded (random orthogonal ⊗ Hadamard) otherwise (kernels/rotation.py).

The first r residual coordinates then carry the outlier directions (kept fp16 by the quantizer); the
other d carry the rest, rotated flat. The norms must keep dividing by the original d: a plain
RMSNorm over d + r with weight sqrt(d / (d + r)) and eps · d / (d + r) computes exactly
x / sqrt(Σx²/d + eps), so the result is a plain checkpoint of the same architecture (hidden_size
d + r, head_dim explicit) that transformers loads without Squeezeflow. Online rotations (before o_proj
and down_proj) belong to the quantized format, not to this dense checkpoint.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ...errors import BadInput
from ...kernels import rotation

# Per block: the norm whose output each reader of the residual stream reads (its weight is folded into the
# reader), in the names each family uses (Phi3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj; a
# fused reader is still x ↦ x Wᵀ on the normed stream, only with more output rows). Absent names are skipped.
NORM_READERS = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.qkv_proj"),
                "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj", "mlp.gate_up_proj")}
READERS = NORM_READERS["input_layernorm"] + NORM_READERS["post_attention_layernorm"]
WRITERS = ("self_attn.o_proj", "mlp.down_proj")
# Qwen3's q_norm/k_norm normalize each head of q_proj/k_proj's OUTPUT (head_dim wide): the rewrite changes
# only the readers' input side, so their weights are copied unchanged. But they share config.rms_norm_eps,
# which the residual norms need scaled by d / (d + r) (module docstring); RMSNorm(c·y) with eps·c² equals
# RMSNorm(y) with eps, so the projection feeding each such norm is scaled by c = sqrt(d / (d + r)).
HEAD_NORMS = {"self_attn.q_norm": "self_attn.q_proj", "self_attn.k_norm": "self_attn.k_proj"}

# Gemma2/3 apply RMSNorms with weight (1 + w) to the attention and MLP OUTPUTS before the residual add. In
# the rotated stream that norm would have to be diag(g)·M = M·diag(g') for its weight g (no linear follows
# it to absorb M), which holds only for a constant g: no same-architecture rewrite preserves the function.
_GEMMA_NORMS = ("its post-attention/post-feedforward RMSNorms scale sublayer outputs elementwise before the "
                "residual add, which does not commute with the residual-stream rotation (no linear absorbs it)")
_MOE = "its mixture-of-experts MLP (router, routed and shared experts) is not rewritten by the QUAD transform"
# model_type -> why the rewrite below does not apply to its blocks (checked at preflight).
UNSUPPORTED_LAYOUTS = {
    "gemma2": _GEMMA_NORMS,
    "gemma3_text": _GEMMA_NORMS,
    "qwen2_moe": _MOE,
    "qwen3_moe": _MOE,
    "mixtral": _MOE,
}
# The block layouts transform_state rewrites exactly (tests/unit/test_quad.py checks each one's logits);
# any other family is refused rather than rewritten on the guess that it is Llama-like.
SUPPORTED_LAYOUTS = ("llama", "mistral", "qwen2", "qwen3", "phi3")


def _longrope(config) -> bool:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return isinstance(rope, dict) and ("short_factor" in rope or "long_factor" in rope)


def layout_refusal(config, r: int) -> str | None:
    """Why QUAD with `r` outlier dimensions cannot rewrite this model into a loadable equivalent, or None."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_LAYOUTS:
        return UNSUPPORTED_LAYOUTS.get(model_type, f"the QUAD transform does not know the {model_type!r} block layout")
    # Phi3Config (unlike the generic rope check) validates longrope factors against hidden_size // heads rather
    # than head_dim, so transformers would refuse the expanded config (Phi-3-128k, Phi-3.5, Phi-4-mini).
    if r and model_type == "phi3" and _longrope(config):
        return (f"transformers checks its longrope factors against hidden_size // num_attention_heads, so the "
                f"checkpoint expanded by r = {r} would not load; QuaRot (r = 0) applies")
    return None


def outlier_projection(cov: torch.Tensor, r: int) -> torch.Tensor:
    """P [d, r]: the top-r eigenvectors of the covariance (fp64), columns in decreasing eigenvalue order,
    each with its largest-magnitude entry made positive (eigh's signs are arbitrary)."""
    if r == 0:
        return torch.zeros(cov.shape[0], 0, dtype=torch.float64, device=cov.device)
    _, vecs = torch.linalg.eigh(cov.double())
    P = vecs[:, -r:].flip(1)
    idx = P.abs().argmax(0)
    return P * torch.sign(P[idx, torch.arange(r, device=cov.device)])


def expansion(cov: torch.Tensor, r: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """M = [P, I − PPᵀ] · diag(R_r, R_d) (d × (d + r), fp64, on cov's device) and the rotation factors used
    (host tensors: they come from a seeded host generator, so every device gets the same rotation)."""
    d, device = cov.shape[0], cov.device
    P = outlier_projection(cov, r)
    Q = torch.cat([P, torch.eye(d, dtype=torch.float64, device=device) - P @ P.T], 1)
    a_d, s_d = rotation.random_factors(d, seed)
    R = torch.zeros(d + r, d + r, dtype=torch.float64, device=device)
    # Built on the host (the factors and the cached Hadamard live there), then moved.
    R[r:, r:] = rotation.dense(a_d, s_d).to(device)
    factors = {"main_a": a_d, "main_signs": s_d}
    if r:
        a_r, s_r = rotation.random_factors(r, seed + 1)
        R[:r, :r] = rotation.dense(a_r, s_r).to(device)
        factors |= {"outlier_a": a_r, "outlier_signs": s_r}
    return Q @ R, factors


def transform_state(state: dict[str, torch.Tensor], config: dict, cov: torch.Tensor, r: int,
                    seed: int, device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """The transformed (state dict, config.json dict). `state` holds fp32 host tensors of a supported model.
    The fp64 products run on `device` one tensor at a time (M stays there); the result is on the host."""
    d = int(config["hidden_size"])
    if cov.shape != (d, d):
        raise BadInput(f"residual covariance is {tuple(cov.shape)}, the model's hidden size is {d}")
    if not 0 <= r <= d // 8:
        raise BadInput(f"QUAD r = {r} is outside 0..{d // 8} (d / 8 for hidden size {d})")
    n_layers = int(config["num_hidden_layers"])
    M, _ = expansion(cov.to(device), r, seed)

    def dev(t: torch.Tensor) -> torch.Tensor:   # one input tensor at a time on the compute device, in fp64
        return t.to(device, torch.float64)

    out: dict[str, torch.Tensor] = {}           # on the host: it becomes the whole checkpoint
    lm_head = dev(state.get("lm_head.weight", state["model.embed_tokens.weight"]))
    out["lm_head.weight"] = ((lm_head * dev(state["model.norm.weight"])) @ M).cpu()
    out["model.embed_tokens.weight"] = (dev(state["model.embed_tokens.weight"]) @ M).cpu()
    norm_weight = torch.full((d + r,), math.sqrt(d / (d + r)), dtype=torch.float64, device="cpu")
    out["model.norm.weight"] = norm_weight
    for i in range(n_layers):
        p = f"model.layers.{i}"
        for norm, readers in NORM_READERS.items():
            gamma = dev(state[f"{p}.{norm}.weight"])
            present = [lin for lin in readers if f"{p}.{lin}.weight" in state]
            if not present:
                raise BadInput(f"QUAD transform: block {i} has no linear reading {norm} (one of {readers})")
            for lin in present:
                out[f"{p}.{lin}.weight"] = ((dev(state[f"{p}.{lin}.weight"]) * gamma) @ M).cpu()
                if f"{p}.{lin}.bias" in state:
                    out[f"{p}.{lin}.bias"] = state[f"{p}.{lin}.bias"].double()
            out[f"{p}.{norm}.weight"] = norm_weight
        for norm, lin in HEAD_NORMS.items():
            if f"{p}.{norm}.weight" in state:
                out[f"{p}.{norm}.weight"] = state[f"{p}.{norm}.weight"].double()
                for field in ("weight", "bias"):
                    if f"{p}.{lin}.{field}" in out:
                        out[f"{p}.{lin}.{field}"] = out[f"{p}.{lin}.{field}"] * math.sqrt(d / (d + r))
        for lin in WRITERS:
            out[f"{p}.{lin}.weight"] = (M.T @ dev(state[f"{p}.{lin}.weight"])).cpu()
            if f"{p}.{lin}.bias" in state:
                out[f"{p}.{lin}.bias"] = (dev(state[f"{p}.{lin}.bias"]) @ M).cpu()
    missing = sorted(set(state) - set(out) - {"lm_head.weight"})
    unknown = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if unknown:
        raise BadInput(f"QUAD transform supports Llama-style blocks only; it does not know {unknown[:5]}")
    cfg = dict(config)
    cfg["head_dim"] = int(config.get("head_dim") or d // int(config["num_attention_heads"]))
    cfg["hidden_size"] = d + r
    cfg["rms_norm_eps"] = float(config.get("rms_norm_eps", 1e-6)) * d / (d + r)
    cfg["tie_word_embeddings"] = False
    cfg["squeezeflow_transform"] = {"method": "quad", "outlier_dims": r, "original_hidden_size": d, "seed": seed}
    return {k: v.float().contiguous() for k, v in sorted(out.items())}, cfg


def transform_checkpoint(src: Path, dst: Path, cov: torch.Tensor, r: int, seed: int,
                         device: torch.device | str = "cpu") -> None:
    """Write the transformed checkpoint of the HF directory `src` into `dst` (safetensors + config + tokenizer);
    the products run on `device` (transform_state)."""
    import shutil

    from safetensors.torch import load_file, save

    from ...models import safetensors_files
    from ...store import canonical_json, canonical_safetensors

    state: dict[str, torch.Tensor] = {}
    for f in safetensors_files(src):
        state.update({k: v.float() for k, v in load_file(f).items()})
    config = json.loads((src / "config.json").read_text())
    new_state, new_config = transform_state(state, config, cov, r, seed, device)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "model.safetensors").write_bytes(canonical_safetensors(save(new_state, metadata={"format": "pt"})))
    (dst / "config.json").write_bytes(canonical_json(new_config))
    for f in sorted(src.iterdir()):
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config", "chat_template")):
            shutil.copyfile(f, dst / f.name)
