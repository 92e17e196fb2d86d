"""transformers as the peer, measured in the same process as prefixgate on the same card.

The peer model has the same shape and random weights; speed does not depend on their values.
"""

from __future__ import annotations

import gc
import time
from typing import Any

import torch

from bench.shapes import hf_config


def _hf_model(shape: str, attn_implementation: str = "sdpa") -> Any:
    from transformers import AutoModelForCausalLM

    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(
            hf_config(shape), dtype=torch.bfloat16, attn_implementation=attn_implementation
        )
    return model.eval()


def _release(model: Any) -> None:
    del model
    gc.collect()
    torch.cuda.empty_cache()


def transformers_generate_ms_per_token(shape: str, prompt: list[int], new_tokens: int) -> float:
    """Plain `generate`, greedy, batch 1: (time for N tokens - time for 1 token) / (N - 1)."""
    model = _hf_model(shape)
    ids = torch.tensor([prompt], device="cuda")

    def timed(count: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=count, min_new_tokens=count, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    timed(4)  # warm-up
    one, many = timed(1), timed(new_tokens)
    _release(model)
    return (many - one) / (new_tokens - 1) * 1000


def transformers_generate_batch(
    shape: str, prompts: list[list[int]], new_tokens: int
) -> dict[str, Any] | None:
    """transformers' continuous batching at its best settings we could run: paged attention,
    CUDA graphs and block sharing on. Not under inference_mode (it fails there)."""
    from transformers import GenerationConfig

    try:
        from transformers import ContinuousBatchingConfig
    except ImportError:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

    errors = []
    for attn in ("paged|sdpa", "sdpa_paged", "sdpa"):
        try:
            model = _hf_model(shape, attn_implementation=attn)
        except (ValueError, ImportError, KeyError) as err:
            errors.append(f"{attn}: {err}")
            continue
        generation = GenerationConfig(
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=-1
        )
        batching = ContinuousBatchingConfig(allow_block_sharing=True, use_cuda_graph=True)
        try:
            model.generate_batch(
                prompts[:8], generation_config=generation, continuous_batching_config=batching
            )
            torch.cuda.synchronize()
            start = time.perf_counter()
            outputs = model.generate_batch(
                prompts, generation_config=generation, continuous_batching_config=batching
            )
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        except Exception as err:  # a peer that fails is reported, not fatal
            errors.append(f"{attn}: {type(err).__name__}: {err}")
            _release(model)
            continue
        produced = sum(len(o.generated_tokens) for o in outputs.values())
        _release(model)
        return {
            "output_tokens_per_s": produced / seconds,
            "seconds": seconds,
            "settings": f"attn={attn}, cuda graphs, block sharing",
        }
    print("transformers generate_batch failed:", "; ".join(errors)[:2000], flush=True)
    return None
