"""The shape of a supported decoder model, read once from a Hugging Face config."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

# Architectures our decoder implements. They differ only in the flags ModelConfig carries:
# Qwen2 adds q/k/v biases, Qwen3 adds per-head RMSNorm on q and k, Llama 3.1 scales rope.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# Rope variants whose frequencies do not depend on the sequence length seen so far.
STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})


class UnsupportedModelError(ValueError):
    """The checkpoint is a model family or variant this engine does not implement."""


@dataclass(frozen=True, slots=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_type: str
    rope_theta: float
    max_position_embeddings: int
    attention_bias: bool
    mlp_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    # Kept so that rope frequencies come from transformers' own code for every rope type.
    hf_config: Any = None

    @staticmethod
    def from_hf(hf_config: Any) -> ModelConfig:
        model_type = hf_config.model_type
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model type {model_type!r} is not supported (supported: {sorted(SUPPORTED_MODEL_TYPES)})"
            )
        rope = dict(getattr(hf_config, "rope_parameters", None) or {})
        rope_type = rope.get("rope_type", "default")
        if rope_type not in STATIC_ROPE_TYPES:
            raise UnsupportedModelError(f"rope type {rope_type!r} is not supported")
        if getattr(hf_config, "use_sliding_window", False) or (
            model_type == "mistral" and getattr(hf_config, "sliding_window", None)
        ):
            raise UnsupportedModelError("sliding-window attention is not supported")
        num_heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        eos = getattr(hf_config, "eos_token_id", None)
        eos_ids = tuple(eos) if isinstance(eos, list | tuple) else (() if eos is None else (eos,))
        return ModelConfig(
            model_type=model_type,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf_config.rms_norm_eps,
            rope_type=rope_type,
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            max_position_embeddings=hf_config.max_position_embeddings,
            # Qwen2 always has q/k/v biases and its config carries no flag for them.
            attention_bias=bool(getattr(hf_config, "attention_bias", model_type == "qwen2")),
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            eos_token_ids=eos_ids,
            hf_config=hf_config,
        )

    def rope_inv_freq(self) -> tuple[torch.Tensor, float]:
        """Inverse frequencies (float32, on CPU) and the cos/sin scale, exactly as transformers has them."""
        with torch.device("cpu"):  # not the meta device the model may be built under
            return self._rope_inv_freq()

    def _rope_inv_freq(self) -> tuple[torch.Tensor, float]:
        if self.rope_type == "default":
            exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
            return 1.0 / (self.rope_theta**exponents), 1.0
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, scale = ROPE_INIT_FUNCTIONS[self.rope_type](self.hf_config, torch.device("cpu"))
        return inv_freq.float(), float(scale)

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V for one token across all layers, per byte of element size."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    def num_parameters(self) -> int:
        attn = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * self.hidden_size * self.intermediate_size
        embed = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + mlp + 2 * self.hidden_size) + embed + self.hidden_size


def describe(config: ModelConfig) -> str:
    params = config.num_parameters()
    scale = 10 ** (3 * int(math.log10(max(params, 1)) // 3))
    unit = {1: "", 10**3: "K", 10**6: "M", 10**9: "B"}.get(scale, "")
    return (
        f"{config.model_type}, {params / scale:.0f}{unit} params, {config.num_layers} layers, "
        f"{config.num_heads} heads / {config.num_kv_heads} KV heads of {config.head_dim}"
    )
