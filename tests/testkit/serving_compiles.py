"""Which Triton kernels an engine compiles after its warm-up, over varied serving steps.

Run in a process of its own (`python -m testkit.serving_compiles MODEL_DIR`, tests/ on the
path), so kernels compiled by earlier tests in one pytest process cannot hide a variant the
warm-up missed: in a fresh process, every variant served after warm-up is a miss of Triton's
in-memory cache, and `triton.knobs.runtime.jit_cache_hook` sees each one (a compile, or a load
from the disk cache that a fresh machine would compile: either stalls a step). Prints one JSON
object: the misses (kernel names) and how many steps and requests ran.
"""

from __future__ import annotations

import json
import random
import sys
from typing import Any

import torch

from engine.config import EngineConfig
from engine.core import EngineCore
from engine.sampling_params import SamplingParams
from engine.warmup import warm_up
from engine.weights import load_model


def _params(rng: random.Random) -> SamplingParams:
    kind = rng.random()
    max_tokens = rng.randrange(1, 24)
    if kind < 0.5:
        return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    if kind < 0.8:
        return SamplingParams(
            temperature=0.8, top_p=0.9, top_k=rng.choice([0, 20]), max_tokens=max_tokens, ignore_eos=True
        )
    logprobs = rng.randrange(0, 4)
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=logprobs)


def serve_varied(core: EngineCore, seed: int = 0, requests: int = 160) -> int:
    """Requests arriving a few per step: prompts of 1 to ~900 tokens, half over cached
    prefixes of varied length, so batch sizes, chunk lengths and cached contexts (and the
    offsets of a step's packed inputs) keep changing. Returns the steps run."""
    rng = random.Random(seed)
    vocab = core.model_config.vocab_size
    prefixes = [[rng.randrange(3, vocab) for _ in range(rng.randrange(16, 600))] for _ in range(6)]
    added = steps = 0
    while added < requests or core.has_unfinished:
        for _ in range(rng.randrange(0, 3) if added < requests else 0):
            tail = [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 300))]
            if rng.random() < 0.5:
                prefix = rng.choice(prefixes)
                prompt = prefix[: rng.randrange(1, len(prefix) + 1)] + tail
            else:
                prompt = tail + [rng.randrange(3, vocab) for _ in range(rng.randrange(0, 600))]
            core.add_request(prompt, _params(rng), request_id=f"varied-{added}", detokenize=False)
            added += 1
        core.step()
        steps += 1
    core.check_integrity()
    return steps


def main(model_dir: str) -> dict[str, Any]:
    import triton  # the GPU machine's; the CPU path has no Triton kernel to compile

    config = EngineConfig(model=model_dir, device="cuda", num_blocks=2048, max_num_seqs=32)
    loaded = load_model(model_dir, dtype=config.torch_dtype(torch.device("cuda")), device="cuda")
    core = EngineCore(config, loaded)
    warm_up(core)
    misses: list[str] = []

    def on_miss(**event: Any) -> None:  # returns None: the kernel compiles (or loads) as usual
        misses.append(getattr(event.get("fn"), "name", str(event.get("fn"))))

    triton.knobs.runtime.jit_cache_hook = on_miss
    try:
        steps = serve_varied(core)
    finally:
        triton.knobs.runtime.jit_cache_hook = None
    replays = core.runner.graphs.replays if core.runner.graphs is not None else 0
    return {"misses": misses, "steps": steps, "graph_replays": replays}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
