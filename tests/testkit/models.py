"""Tiny random Hugging Face checkpoints, saved to disk so both transformers and we load them."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PreTrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

TINY_VOCAB = 512


def tiny_config(family: str) -> PreTrainedConfig:
    common = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        eos_token_id=2,
        bos_token_id=1,
    )
    if family == "llama":
        return LlamaConfig(**common)
    if family == "llama-d64":  # 64-wide heads: what the fused qkv kernel (and the norm fold) take
        return LlamaConfig(**{**common, "hidden_size": 256, "intermediate_size": 512})
    if family == "llama31":  # Llama 3.1's rope scaling, tied embeddings as in the 1B/3B models
        return LlamaConfig(
            **common,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    if family == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "qwen3":
        return Qwen3Config(**common, head_dim=32)
    raise ValueError(family)


def save_tiny_model(family: str, folder: Path, seed: int = 0) -> Path:
    """Random weights with a larger std than the default init, so logits are not all near zero."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 0.08)
            elif param.dim() == 1:
                param.uniform_(0.8, 1.2)
    model.save_pretrained(folder)
    return folder
