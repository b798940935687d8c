"""Plain helpers shared by the test suite (not fixtures): tiny models and environment snapshots."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from squeezeflow import services

# Figures the hardening tests report at the end of the run ("bad inputs: 34/34 rejected cleanly"):
# label -> [passed, total], printed by tests/conftest.py's pytest_terminal_summary.
COUNTS: dict[str, list[int]] = {}


def tally(label: str, ok: bool) -> None:
    passed, total = COUNTS.setdefault(label, [0, 0])
    COUNTS[label] = [passed + int(ok), total + 1]


def make_tiny_llama(dest: Path, tokenizer_src: Path, num_layers: int = 2, hidden: int = 64, seed: int = 0) -> Path:
    """A tiny random Llama with the SmolLM2 tokenizer: real tokenization, millisecond forwards."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True, dtype="float32")
    model = LlamaForCausalLM(config)
    model.save_pretrained(dest, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_src).save_pretrained(dest)
    return dest


# Per-architecture tiny configs: (config class, model class, extra config fields). Every one keeps the SmolLM2
# vocabulary (so the real tokenizer fits) and shows its family's quirk at test scale: Mistral's window (16) is
# shorter than the tests' seqlen (32), Qwen2 has q/k/v biases and a sliding second layer, Qwen3 q/k norms,
# Gemma2/3 (1+w) norms, the √d embedding scale, soft-capping and alternating sliding/full layers, Phi3 fused
# qkv_proj / gate_up_proj.
TINY_ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 16, "tie_word_embeddings": False}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 16,
                                                  "max_window_layers": 1}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "sliding_window": 16,
                                                      "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, "sliding_window": 16,
                                                         "layer_types": ["sliding_attention", "full_attention"]}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"tie_word_embeddings": False, "pad_token_id": 0}),
}


# Mixture-of-experts families (tests/unit/test_moe.py): 4 routed experts, top-2; Qwen2-MoE adds its shared expert
# and sigmoid gate. Expert widths stay multiples of 32 so every group size / 2:4 / VQ preset applies.
TINY_MOE_ARCHS = {
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2,
                                                            "moe_intermediate_size": 64,
                                                            "shared_expert_intermediate_size": 128}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2,
                                                            "moe_intermediate_size": 64, "head_dim": 16}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
}


# Every recipe family, a chain included (YAML-free presets; trsp / shortgpt remove one of a tiny model's two
# blocks), as the architecture tests run them on every family's tiny model.
RECIPE_FAMILIES = ("rtn-w4g32", "gptq-w4g32", "gwq-w4g32", "nowag-p50", "nowag-p2:4", "nowag-vq2d4", "wanda-p50",
                   "trsp-50", "shortgpt-50", "rf8", "fp8-e4m3", "rtn-w4g32-eg", "backslash-l1000-w8gc-s2",
                   "trsp-50+rtn-w4g32")


# Iteration counts cut to what a 2-block, 64-wide model needs (the presets' defaults are sized for real models).
FAST_SETTINGS = {"trsp": {"windows": 2, "seqlen": 32, "steps": 4, "stage2_steps": 4, "batch_size": 2},
                 "nowag-vq": {"max_iter": 10}, "backslash": {"windows": 2}}


def fast_recipe(name: str):
    """The preset `name` with FAST_SETTINGS applied to its methods."""
    from squeezeflow.recipes import load_recipe

    recipe = load_recipe(name)
    return recipe.model_copy(update={"methods": [m.model_copy(update=FAST_SETTINGS.get(m.method, {}))
                                                 for m in recipe.methods]})


def load_and_generate(path):
    """`squeezeflow.load` the artifact at `path`, greedy-generate 4 tokens, check the logits are finite."""
    import squeezeflow
    from transformers import AutoTokenizer

    model = squeezeflow.load(str(path))
    ids = AutoTokenizer.from_pretrained(path)("The state of the union", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4
    assert torch.isfinite(model(ids).logits).all()
    return model


def make_tiny(arch: str, dest: Path, tokenizer_src: Path, num_layers: int = 2, hidden: int = 64, seed: int = 0) -> Path:
    """A tiny random model of one of TINY_ARCHS or TINY_MOE_ARCHS with the SmolLM2 tokenizer (see make_tiny_llama)."""
    import transformers
    from transformers import AutoTokenizer

    config_cls, model_cls, extra = TINY_ARCHS[arch] if arch in TINY_ARCHS else TINY_MOE_ARCHS[arch]
    torch.manual_seed(seed)
    fields = dict(vocab_size=49152, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=True, dtype="float32")
    config = getattr(transformers, config_cls)(**{**fields, **extra})
    model = getattr(transformers, model_cls)(config)
    # Random init leaves norms at their identity (Gemma's (1+w) at w = 0): perturb every parameter a little so
    # a norm applied the wrong way, or a bias dropped, shows in the logits.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(dest, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_src).save_pretrained(dest)
    return dest


def reset_boto3_session() -> None:
    """boto3's default session caches credentials; tests that change them must drop it."""
    if "boto3" in sys.modules:
        sys.modules["boto3"].DEFAULT_SESSION = None


class EnvSnapshot:
    """Restore os.environ and the services module's notion of what it exported."""

    def __init__(self) -> None:
        self.env = dict(os.environ)
        self.exported = (services._exported_s3, services._exported_prefect)

    def restore(self) -> None:
        os.environ.clear()
        os.environ.update(self.env)
        services._exported_s3, services._exported_prefect = self.exported
        reset_boto3_session()


def packed_sha256(store, model_path, recipe: str, calibration, evaluation) -> str:
    """sha256 of the packed model.safetensors that `recipe` makes of the model at `model_path`."""
    from squeezeflow import pipeline
    from squeezeflow.config import ModelRef

    job = pipeline.preflight(ModelRef(ref=str(model_path)), recipe, calibration, evaluation)
    _, packed = pipeline.compress_to_packed(store, job)
    return store.get_tree(packed)["model.safetensors"].sha256


def packed_summary(path) -> dict:
    """{"layout": sha256 of a safetensors file's header without offsets, "norms": {tensor: [L1, L2²]}}: what
    pins hold for results that follow the CPU's float kernels (tests/unit/test_packed_pins.py)."""
    import hashlib
    import struct

    from safetensors import safe_open

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    layout = {k: v if k == "__metadata__" else [v["dtype"], v["shape"]] for k, v in header.items()}
    norms = {}
    with safe_open(path, "pt") as st:
        for k in sorted(st.keys()):
            t = st.get_tensor(k).double()
            norms[k] = [float(t.abs().sum()), float((t * t).sum())]
    return {"layout": hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest(), "norms": norms}


def run_stages(store, job, base: bool = True) -> dict:
    """The job's plan (publish excluded) run with plain calls, no Prefect: what a flow run computes.
    Returns the stage outputs by role (calib, stats, blocks, packed, metrics, baseline, artifact)."""
    from squeezeflow import pipeline

    return pipeline.run_job(job, store)


def correlated_layer(out: int = 64, inp: int = 256, tokens: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, H = XᵀX in fp64) for a layer whose inputs are correlated (X = Z·A mixes them), so H is far from
    diagonal and error compensation has something to exploit."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(tokens, inp, generator=gen) @ (torch.randn(inp, inp, generator=gen) / inp ** 0.5)
    W = torch.randn(out, inp, generator=gen) * 0.02
    return W, X.double().T @ X.double()


def output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """Σ over rows of (W − Ŵ) H (W − Ŵ)ᵀ: the layer's squared output error on the inputs behind H."""
    D = (W - W_hat).double()
    return float(torch.einsum("oi,ij,oj->", D, H.double(), D))
