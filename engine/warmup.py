"""Requests a replica runs before it reports ready, so that no served request pays a compile.

Every engine warms up with one short request through the whole path (shorter than a block, so
nothing is cached). On a GPU, extend attention (run eagerly, between piecewise graphs) also
compiles per variant of its compile-time constants on first use: narrow and wide tiles, each
unsplit and split across the keys. Served, each first use stalled a step for ~1-1.6 s (the
step logs of a 2-GPU run, bench.step_fit), and every request queued behind it waited too. So
on a GPU four small batches run first, one per variant; their blocks are then dropped from
the prefix cache and their KV events discarded, leaving the replica as it started.
"""

from __future__ import annotations

import itertools

from engine.core import EngineCore
from engine.sampling_params import SamplingParams

_GREEDY = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, logprobs=1)
_request_ids = itertools.count()
_LONGEST = 1024  # tokens: the longest warm-up prompt (812) and then some
_FIRST_TOKEN = 100  # warm-up prompts are runs of consecutive ids from here (any ids would do)


def warm_up(core: EngineCore, kernel_variants: bool | None = None) -> None:
    """`kernel_variants`: run the batches that compile them (default: on a GPU only; the CPU
    path has no kernel to compile)."""
    prompt = list(range(1, min(core.block_size, core.model_config.vocab_size) // 2 + 1))
    _run(core, [prompt])
    if kernel_variants is None:
        kernel_variants = core.runner.device.type == "cuda"
    if not kernel_variants or core.model_config.vocab_size < 2 * _FIRST_TOKEN:
        return
    if core.max_model_len < _LONGEST or core.num_blocks * core.block_size < 4 * _LONGEST:
        return  # a replica this small would not fit the batches (nor serve such prompts)
    ids = _Ids(core.model_config.vocab_size)
    cached = 512  # 32 blocks of 16: a context the split kernel takes (2 x 256 keys or more)
    prefix = ids.take(cached + 128)
    _run(core, [prefix])  # a chunk past the chunk graphs' largest bucket: wide tiles
    _run(core, [ids.take(20), ids.take(20)])  # two short chunks: narrow tiles
    _run(core, [prefix[:cached] + ids.take(300), ids.take(20)])  # over a cached context: split, wide
    _run(core, [prefix[:cached] + ids.take(50), ids.take(20)])  # split, narrow
    if core.tree is not None:
        core.tree.clear()
    core.drain_kv_events()
    core.check_integrity()


def _run(core: EngineCore, prompts: list[list[int]]) -> None:
    """The prompts admitted together (one step holds all their chunks), run to the end."""
    for prompt in prompts:
        core.add_request(prompt, _GREEDY, request_id=f"warm-up-{next(_request_ids)}", detokenize=False)
    while core.has_unfinished:
        core.step()


class _Ids:
    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.next = 0

    def take(self, n: int) -> list[int]:
        out = [_FIRST_TOKEN + (self.next + i) % (self.vocab_size - _FIRST_TOKEN) for i in range(n)]
        self.next += n
        return out
