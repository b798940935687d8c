"""Plain helpers shared by the test suite (not fixtures): tiny models and environment snapshots."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from squeezeflow import services


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
