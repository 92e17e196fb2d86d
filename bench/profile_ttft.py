"""Where the TTFT of a chunk over a cached prefix goes on a GPU, beside a bare prompt's.

    python -m bench.profile_ttft --shape llama3-8b

The cached-prefix TTFT target (bench/offline.py: 128 new tokens on 8,192 cached <= 1.3x a
bare 128-token prompt) is a difference of a few milliseconds; this splits each TTFT into
add_request (validation), the scheduler (prefix hashing and matching, block allocation),
building the batch, the GPU time of the forward (CUDA events around the graph replay or the
eager forward), sampling and the copy back, and the update, so the gap is not guessed.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from bench.gpu_engine import build_engine, random_prompt, warm_up
from bench.profile_decode import kernel_spans, timeline_report
from bench.shapes import SHAPES
from engine.core import EngineCore
from engine.sampling_params import SamplingParams


class PhaseClock:
    """Wall time of named calls of one TTFT, and the GPU time of the model's forwards."""

    def __init__(self, gpu: bool) -> None:
        self.gpu = gpu
        self.wall: dict[str, float] = defaultdict(float)
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def wrap(self, name: str, fn: Callable[..., Any], gpu: bool = False) -> Callable[..., Any]:
        gpu = gpu and self.gpu

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            if gpu:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
            result = fn(*args, **kwargs)
            if gpu:
                end.record()
                self.events.append((begin, end))
            self.wall[name] += time.perf_counter() - start
            return result

        return timed

    def gpu_ms(self) -> float:
        if not self.gpu:
            return 0.0
        torch.cuda.synchronize()
        return sum(b.elapsed_time(e) for b, e in self.events)


def profile(engine: EngineCore, prompt: list[int]) -> dict[str, float]:
    cuda = engine.device.type == "cuda"
    clock = PhaseClock(cuda)
    runner, scheduler = engine.runner, engine.scheduler
    saved = (scheduler.schedule, scheduler.advance, scheduler.resolve, runner.launch, runner.model.forward)
    scheduler.schedule = clock.wrap("schedule", scheduler.schedule)  # type: ignore[method-assign]
    scheduler.advance = clock.wrap("advance", scheduler.advance)  # type: ignore[method-assign]
    scheduler.resolve = clock.wrap("resolve", scheduler.resolve)  # type: ignore[method-assign]
    runner.launch = clock.wrap("launch (build + forward + sample)", runner.launch)  # type: ignore[method-assign]
    runner.model.forward = clock.wrap("eager forward (launch)", runner.model.forward, gpu=True)  # type: ignore[method-assign]
    if runner.graphs is not None:
        runner.graphs.run_any = clock.wrap("graph replay (launch)", runner.graphs.run_any, gpu=True)  # type: ignore[method-assign]
    try:
        _sync(cuda)
        start = time.perf_counter()
        request = clock.wrap("add_request", engine.add_request)(
            prompt, SamplingParams(max_tokens=1, ignore_eos=True)
        )
        steps = 0
        while engine.has_unfinished:
            engine.step()
            steps += 1
        _sync(cuda)
        total = time.perf_counter() - start
    finally:
        (scheduler.schedule, scheduler.advance, scheduler.resolve, runner.launch, runner.model.forward) = (
            saved  # type: ignore[method-assign]
        )
        if runner.graphs is not None:
            del runner.graphs.run_any  # back to the class's method
    out = {name: seconds * 1000 for name, seconds in clock.wall.items()}
    out["forward GPU time"] = clock.gpu_ms()
    out["total wall"] = total * 1000
    out["engine TTFT"] = (request.times.ttft or 0.0) * 1000
    out["steps"] = steps
    return out


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--prefix", type=int, default=8192, help="cached prefix tokens")
    parser.add_argument("--new", type=int, default=128, help="new tokens, and the bare prompt's length")
    parser.add_argument("--device", default="cuda", help="cpu: to try the script on a small shape")
    parser.add_argument(
        "--kernels", action="store_true", help="then each case's GPU time by kernel (torch.profiler)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    options: dict[str, Any] = {"max_num_seqs": 256, "max_batched_tokens": 8192}
    if device.type == "cuda":
        options["gpu_memory_fraction"] = 0.5
    else:
        options["num_blocks"] = 2 * (args.prefix + args.new) // 16 + 64
    engine = build_engine(args.shape, device, **options)
    if device.type == "cuda":
        warm_up(engine)
    rng = random.Random(4)
    vocab = engine.model_config.vocab_size
    prefix = random_prompt(rng, args.prefix, vocab)
    profile(engine, prefix + random_prompt(rng, 16, vocab))  # puts the prefix in the cache
    cases = {
        f"bare {args.new}": lambda: random_prompt(rng, args.new, vocab),
        f"{args.prefix:,} cached + {args.new}": lambda: prefix + random_prompt(rng, args.new, vocab),
    }
    rows: dict[str, dict[str, float]] = {}
    for name, make in cases.items():
        runs = [profile(engine, make()) for _ in range(args.repeat)]
        rows[name] = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    keys = list(dict.fromkeys(key for row in rows.values() for key in row))
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"card {card}, shape {args.shape}; medians of {args.repeat}, ms")
    print(f"{'phase':<44}" + "".join(f"{name:>20}" for name in rows))
    for key in keys:
        print(f"{key:<44}" + "".join(f"{row.get(key, 0.0):>20.3f}" for row in rows.values()))
    if args.kernels and device.type == "cuda":
        for name, make in cases.items():
            print(f"\n## {name}: kernels of one TTFT (median of {args.repeat})")
            for line in kernel_table(engine, [make() for _ in range(args.repeat)]):
                print(line)


def kernel_table(engine: EngineCore, prompts: list[list[int]]) -> list[str]:
    """The kernels of whole TTFTs (prefill and sampling), by kind, per TTFT."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for prompt in prompts:
            engine.add_request(prompt, SamplingParams(max_tokens=1, ignore_eos=True))
            while engine.has_unfinished:
                engine.step()
        torch.cuda.synchronize()
    return timeline_report(kernel_spans(prof), len(prompts), window=0, top=24)


if __name__ == "__main__":
    main()
