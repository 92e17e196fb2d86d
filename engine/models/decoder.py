"""One decoder for the Llama and Qwen families over a flat, paged batch of sequences.

Llama 2/3/3.1, SmolLM2 and Mistral (no sliding window) are this model as is; Qwen2 turns on
q/k/v biases and Qwen3 per-head q/k RMSNorm. The batch has no padding: tokens of all
sequences are concatenated, and the attention backend finds each sequence's cached prefix
through the block table (kernels.metadata.AttentionMetadata).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.model_config import ModelConfig
from engine.models.layers import FusedQkv, Linear, NormFold, RMSNorm, RotaryEmbedding
from kernels.backend import AttentionBackend
from kernels.elementwise import TORCH_OPS, ElementwiseOps
from kernels.metadata import AttentionMetadata


class Attention(nn.Module):
    def __init__(
        self, config: ModelConfig, rotary: RotaryEmbedding, backend: AttentionBackend, ops: ElementwiseOps
    ) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.scale = config.head_dim**-0.5
        # q, k and v in one matmul; the loader fills the three row ranges from the checkpoint.
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, ops) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, ops) if config.qk_norm else None
        self.rotary = rotary
        self.backend = backend
        # Set by engine/skinny.py on a GPU where it measured faster than the three launches.
        self.fused_qkv: FusedQkv | None = None

    def project(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> torch.Tensor:
        """The query [T, heads, head_dim], once this step's keys and values are rotated and stored.

        Its launches depend only on the token count, so a CUDA graph per token count can hold it.
        """
        num_tokens = hidden.shape[0]
        fused = self.fused_qkv
        if fused is not None and num_tokens <= fused.max_rows:
            qkv = self.qkv_proj
            rotary = self.rotary
            return fused.kernel(
                hidden, qkv.weight, qkv.bias, positions, rotary.cos, rotary.sin, kv_cache, slot_mapping,
                self.num_heads, self.num_kv_heads,
            )  # fmt: skip
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q)[0], self.k_norm(k)[0]
        q, k = self.rotary(positions, q, k)
        self.backend.store(k, v, kv_cache, slot_mapping)
        return q

    def attend(
        self,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention over each sequence's context: its launch depends on the batch's sequences."""
        return self.backend.attend(query, kv_cache, metadata, self.scale, out)

    def output(self, attn_out: torch.Tensor) -> torch.Tensor:
        return self.o_proj(attn_out.reshape(attn_out.shape[0], self.q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, ops: ElementwiseOps) -> None:
        super().__init__()
        self.ops = ops
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        down = self.down_proj
        if down.skinny is not None and down.skinny.fold_silu and gate_up.shape[0] <= down.skinny.max_rows:
            # The activation folded into the down projection's loads: one launch fewer.
            return down.skinny.kernel(gate_up, down.weight, down.bias, True)
        return down(self.ops.silu_and_mul(gate_up))


class DecoderLayer(nn.Module):
    def __init__(
        self, config: ModelConfig, rotary: RotaryEmbedding, backend: AttentionBackend, ops: ElementwiseOps
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.self_attn = Attention(config, rotary, backend, ops)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.mlp = MLP(config, ops)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sublayer output, residual stream); the next norm adds the two, fused with the norm."""
        query, residual = self.attention_inputs(hidden, residual, positions, kv_cache, metadata.slot_mapping)
        return self.after_attention(self.self_attn.attend(query, kv_cache, metadata), residual)

    def attention_inputs(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(query, residual stream): the layer's work before attention, keys and values stored."""
        normed, residual = self.input_layernorm(hidden, residual)
        return self.self_attn.project(normed, positions, kv_cache, slot_mapping), residual

    def after_attention(
        self, attn_out: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sublayer output, residual stream) from attention's output [T, heads, head_dim]."""
        normed, residual = self.post_attention_layernorm(self.self_attn.output(attn_out), residual)
        return self.mlp(normed), residual

    def forward_folded(
        self,
        stream: torch.Tensor,
        fold: NormFold,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        first: bool = False,
    ) -> torch.Tensor:
        """The residual stream after this layer, with no norm kernel: the matmuls after each norm
        normalise their input rows themselves and the ones before it add the residual, so the
        stream is the only activation passed between them (the norms' weights are in W).

        The first layer's input, the embeddings, comes from no matmul that left its rows'
        sums of squares: its norm runs as a kernel (with a unit weight)."""
        query = self.attention_inputs_folded(stream, fold, positions, kv_cache, metadata.slot_mapping, first)
        return self.after_attention_folded(self.self_attn.attend(query, kv_cache, metadata), stream, fold)

    def attention_inputs_folded(
        self,
        stream: torch.Tensor,
        fold: NormFold,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        first: bool = False,
    ) -> torch.Tensor:
        attn = self.self_attn
        qkv = attn.qkv_proj
        rotary = attn.rotary
        args = (positions, rotary.cos, rotary.sin, kv_cache, slot_mapping, attn.num_heads, attn.num_kv_heads)
        if first:
            return fold.qkv(self.input_layernorm(stream)[0], qkv.weight, qkv.bias, *args)
        return fold.qkv(
            stream, qkv.weight, qkv.bias, *args, norm_stats=fold.stats, norm_eps=self.input_layernorm.eps
        )

    def after_attention_folded(
        self, attn_out: torch.Tensor, stream: torch.Tensor, fold: NormFold
    ) -> torch.Tensor:
        o_proj, mlp = self.self_attn.o_proj, self.mlp
        stats = fold.stats
        stream = fold.matmul(
            attn_out.reshape(attn_out.shape[0], -1), o_proj.weight, o_proj.bias, False,
            residual=stream, row_stats=stats,
        )  # fmt: skip
        if fold.mlp is not None and stream.shape[0] <= fold.mlp_rows:  # no MLP biases (engine/skinny.py)
            return fold.mlp(
                stream,
                mlp.gate_up_proj.weight,
                mlp.down_proj.weight,
                stats,
                self.post_attention_layernorm.eps,
            )
        gate_up = fold.matmul(
            stream, mlp.gate_up_proj.weight, mlp.gate_up_proj.bias, False,
            norm_stats=stats, norm_eps=self.post_attention_layernorm.eps,
        )  # fmt: skip
        # The statistics are overwritten only once the gate_up kernel that read them is done:
        # kernels run in stream order (with PDL, each waits for its predecessor first).
        return fold.matmul(
            gate_up, mlp.down_proj.weight, mlp.down_proj.bias, True, residual=stream, row_stats=stats
        )


class DecoderModel(nn.Module):
    """Embeddings, layers and final norm; parameter names follow transformers' `model.*`."""

    def __init__(self, config: ModelConfig, backend: AttentionBackend, ops: ElementwiseOps) -> None:
        super().__init__()
        inv_freq, rope_scale = config.rope_inv_freq()
        rotary = RotaryEmbedding(inv_freq, rope_scale, config.max_position_embeddings, ops)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, rotary, backend, ops) for _ in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        # Shared by every layer; registered once here so .to() moves it once.
        self.rotary = rotary
        # Set by engine/skinny.py on a GPU where the folded layers measured faster.
        self.norm_fold: NormFold | None = None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        fold = self.norm_fold
        if fold is not None and hidden.shape[0] <= fold.max_rows:
            for index, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
                hidden = layer.forward_folded(hidden, fold, positions, kv_cache, metadata, first=index == 0)
            return self.norm(hidden)[0]
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(hidden, residual, positions, kv_cache, metadata)
        return self.norm(hidden, residual)[0]


class CausalLM(nn.Module):
    def __init__(
        self, config: ModelConfig, backend: AttentionBackend, ops: ElementwiseOps = TORCH_OPS
    ) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderModel(config, backend, ops)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """Final hidden states [T, hidden] for every new token of the batch."""
        return self.model(input_ids, positions, kv_caches, metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits for the rows that sample (only those pay for the vocabulary matmul)."""
        return self.lm_head(hidden).float()
