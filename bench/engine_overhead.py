"""Host-side cost of the engine core, without the model: scheduling and prefix matching.

    python -m bench.engine_overhead

Prints a markdown table: the scheduler's schedule() + update() time per step at several
batch sizes (decode-only and with chunked prefills), the time to turn a plan into model
inputs, and the cost of hashing and matching a 10K-token prompt against the radix tree.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from collections.abc import Callable

import torch

from cache.block_pool import BlockPool
from cache.hashing import BlockHasher
from cache.radix_tree import RadixCache
from engine.batch import SequenceChunk, build_forward_batch
from engine.kv_manager import KVCacheManager
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import SampledToken, Scheduler, SchedulerConfig
from policies.queue import queue_policy

BLOCK_SIZE = 16


def _timed(fn: Callable[[], object], repeat: int) -> float:
    """Median seconds of `repeat` calls."""
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _scheduler(num_blocks: int, max_seqs: int, budget: int) -> Scheduler:
    pool = BlockPool(num_blocks)
    tree = RadixCache(pool, BLOCK_SIZE)
    kv = KVCacheManager(pool, BlockHasher("bench", BLOCK_SIZE), tree)
    return Scheduler(
        SchedulerConfig(max_num_seqs=max_seqs, max_batched_tokens=budget), kv, queue_policy("fcfs")
    )


def scheduler_step_cost(batch: int, prompt_len: int, steps: int, budget: int) -> tuple[float, float, int]:
    """Median (schedule + update) and (build inputs) seconds per step, with `batch` requests."""
    rng = random.Random(batch)
    scheduler = _scheduler(
        num_blocks=batch * (prompt_len + steps + 64) // BLOCK_SIZE + 64, max_seqs=batch, budget=budget
    )
    params = SamplingParams(temperature=0.0, max_tokens=10_000, ignore_eos=True)
    shared = [rng.randrange(50_000) for _ in range(prompt_len // 2)]
    for i in range(batch):
        tokens = shared + [rng.randrange(50_000) for _ in range(prompt_len - len(shared))]
        scheduler.add(Request(f"r{i}", tokens, len(tokens), params, arrival_seq=i))
    schedule_times, build_times, tokens_per_step = [], [], []
    cpu = torch.device("cpu")
    for _ in range(steps):
        start = time.perf_counter()
        plan = scheduler.schedule()
        mid = time.perf_counter()
        chunks = [
            SequenceChunk(c.request.token_ids[c.start : c.start + c.num_tokens], c.start, c.request.block_ids)
            for c in plan.chunks
        ]
        build_forward_batch(chunks, BLOCK_SIZE, cpu)
        built = time.perf_counter()
        scheduler.update(plan, [SampledToken(7) for c in plan.chunks if c.samples])
        end = time.perf_counter()
        schedule_times.append((mid - start) + (end - built))
        build_times.append(built - mid)
        tokens_per_step.append(plan.num_tokens)
    scheduler.check_integrity()
    return statistics.median(schedule_times), statistics.median(build_times), max(tokens_per_step)


def prefix_match_cost(prompt_len: int, repeat: int) -> dict[str, float]:
    rng = random.Random(0)
    tokens = [rng.randrange(50_000) for _ in range(prompt_len)]
    hasher = BlockHasher("bench", BLOCK_SIZE)
    pool = BlockPool(prompt_len // BLOCK_SIZE * 4 + 16)
    tree = RadixCache(pool, BLOCK_SIZE)
    # A tree with the prompt cached plus 200 other conversations branching off its prefix.
    hashes = hasher.hashes(tokens)
    tree.insert(hashes, tokens[: len(hashes) * BLOCK_SIZE], pool.allocate(len(hashes)))
    for branch in range(200):
        cut = rng.randrange(1, len(hashes)) * BLOCK_SIZE
        other = tokens[:cut] + [rng.randrange(50_000) for _ in range(BLOCK_SIZE * 2)]
        other_hashes = hasher.hashes(other)
        new = len(other_hashes) - cut // BLOCK_SIZE
        ids = tree.match_prefix(other_hashes).block_ids + pool.allocate(new)
        tree.insert(other_hashes, other[: len(other_hashes) * BLOCK_SIZE], ids)
        del branch
    return {
        "hash": _timed(lambda: hasher.hashes(tokens), repeat),
        "match": _timed(lambda: tree.match_prefix(hashes), repeat),
        "hash+match": _timed(lambda: tree.match_prefix(hasher.hashes(tokens)), repeat),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--prompt-len", type=int, default=10_000)
    args = parser.parse_args()

    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"python {platform.python_version()}, torch {torch.__version__}\n"
    )
    print("| requests | step tokens | schedule + update per step | build model inputs per step |")
    print("|---:|---:|---:|---:|")
    for batch in (1, 16, 64, 256):
        # Decode-heavy: prompts prefill within the first steps, then one token per request per step.
        sched, build, tokens = scheduler_step_cost(batch, prompt_len=512, steps=args.steps, budget=8192)
        print(f"| {batch} | {tokens} | {sched * 1e6:.0f} us | {build * 1e6:.0f} us |")
    sched, build, tokens = scheduler_step_cost(64, prompt_len=2048, steps=args.steps, budget=512)
    print(f"| 64, chunked 2K prompts | {tokens} | {sched * 1e6:.0f} us | {build * 1e6:.0f} us |")

    costs = prefix_match_cost(args.prompt_len, repeat=50)
    print(f"\n| {args.prompt_len}-token prompt ({args.prompt_len // BLOCK_SIZE} blocks) | median |")
    print("|---|---:|")
    for name, seconds in costs.items():
        print(f"| {name} | {seconds * 1e6:.0f} us |")


if __name__ == "__main__":
    main()
