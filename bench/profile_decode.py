"""Where a batch-1 decode step's time goes on a GPU: graph replay vs the host around it.

    python -m bench.profile_decode --shape llama3-8b

Prints, per decode step (median): wall time, the GPU time of the graph replay alone (CUDA
events), the time of each host phase (schedule, build inputs, sample + copy back, update),
and the weight-read roofline, so the gap is split between GPU work and host gaps.
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from bench.gpu_engine import build_engine, copy_bandwidth, weight_bytes_per_step
from bench.shapes import SHAPES
from engine.batch import SequenceChunk, build_forward_batch
from engine.core import EngineCore
from engine.sampler import SamplingInputs
from engine.sampling_params import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--steps", type=int, default=64)
    args = parser.parse_args()
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    # The phase-by-phase loop below drives the scheduler and the graphs by hand, one step at
    # a time; the engine's own loop, with and without overlap, is timed after it.
    engine = build_engine(
        args.shape, device, max_num_seqs=64, gpu_memory_fraction=0.3, overlap_scheduling=False
    )
    graphs = engine.runner.graphs
    assert graphs is not None
    rng = random.Random(0)
    prompt = [rng.randrange(100, 100_000) for _ in range(512)]
    request = engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=10_000, ignore_eos=True))
    engine.step()  # prefill

    phases: dict[str, list[float]] = {k: [] for k in ("schedule", "build", "replay+sample", "update", "wall")}
    gpu_replay: list[float] = []
    start_event = torch.cuda.Event(enable_timing=True)
    end_event = torch.cuda.Event(enable_timing=True)
    for _ in range(args.steps):
        t0 = time.perf_counter()
        plan = engine.scheduler.schedule()
        t1 = time.perf_counter()
        chunk = plan.chunks[0]
        batch = build_forward_batch(
            [SequenceChunk(request.token_ids[chunk.start :], chunk.start, request.block_ids)],
            engine.block_size,
            device,
        )
        t2 = time.perf_counter()
        start_event.record()
        logits = graphs.run(batch)
        end_event.record()
        inputs = SamplingInputs.build(
            [request.params], [None], [()], [()], engine.model_config.vocab_size, device
        )
        tokens = engine.runner.sampler(logits, inputs).token_ids.tolist()
        t3 = time.perf_counter()
        from engine.scheduler import SampledToken

        engine.scheduler.update(plan, [SampledToken(tokens[0])])
        t4 = time.perf_counter()
        gpu_replay.append(start_event.elapsed_time(end_event) / 1000)
        for name, value in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0), strict=True):
            phases[name].append(value)

    roofline = weight_bytes_per_step(engine.model_config) / bandwidth
    gemv = _gemv_time(engine.runner.model, device)
    print(f"card {torch.cuda.get_device_name(device)}, copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    from kernels.triton_pdl import use_pdl  # needs triton: not at import (tests/bench reads this module)

    print(f"skinny matmuls on: {', '.join(engine.skinny_matmuls) or 'none'}; PDL {use_pdl(device)}")
    print(f"roofline (weights / bandwidth): {roofline * 1e3:.2f} ms")
    print(f"graph replay GPU time: {statistics.median(gpu_replay) * 1e3:.2f} ms")
    print(f"the step's matmuls alone at batch 1 (eager, events): {gemv * 1e3:.2f} ms")
    for name, values in phases.items():
        print(f"{name}: {statistics.median(values) * 1e3:.3f} ms")
    engine.abort(request.request_id)
    replay = statistics.median(gpu_replay)
    for overlap in (False, True):
        period = _engine_step_period(engine, prompt, overlap, args.steps)
        print(
            f"engine.step() loop, overlap {'on' if overlap else 'off'}: {period * 1e3:.3f} ms/token, "
            f"GPU idle between steps ~{max(period - replay, 0.0) * 1e3:.3f} ms "
            f"({(period - replay) / period:.1%})"
        )
    _kernel_table(engine, prompt)


def _kernel_table(engine: EngineCore, prompt: list[int], steps: int = 20) -> None:
    """GPU time per decode step by kernel (torch.profiler sees the kernels inside graph replays)."""
    from torch.profiler import ProfilerActivity, profile

    engine.overlap = True
    request = engine.add_request(
        prompt, SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True)
    )
    for _ in range(4):  # prefill and the first decodes stay out of the table
        engine.step()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    engine.abort(request.request_id)
    for line in timeline_report(kernel_spans(prof), steps):
        print(line)


@dataclass(frozen=True)
class KernelSpan:
    name: str
    start_us: float
    end_us: float


def kernel_spans(prof: Any) -> list[KernelSpan]:
    """The GPU kernels a torch.profiler run saw (inside graph replays too), as spans."""
    return [
        KernelSpan(e.name, e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
    ]


def timeline_report(spans: Sequence[KernelSpan], steps: int, window: int = 24, top: int = 18) -> list[str]:
    """Kernel time by kind, the GPU idle between kernels, and one stretch of consecutive kernels.

    A kernel's time here is what it adds past the end of the kernel before it: with
    programmatic dependent launch (kernels/triton_pdl.py) a kernel is placed before its
    predecessor ends and waits inside, so its own start-to-end time double-counts the overlap;
    without PDL the two are the same. The sum of these times and the gaps is the span."""
    ordered = sorted(spans, key=lambda s: s.start_us)
    if not ordered:
        return []
    added: list[float] = []
    gaps: list[float] = []
    previous_end = ordered[0].start_us
    for span in ordered:
        gaps.append(max(0.0, span.start_us - previous_end))
        added.append(max(0.0, span.end_us - max(span.start_us, previous_end)))
        previous_end = max(previous_end, span.end_us)
    busy = sum(added)
    span_us = previous_end - ordered[0].start_us
    lines = [
        f"timeline: {len(ordered) / steps:.0f} kernels a step, {busy / steps / 1e3:.3f} ms of kernel time "
        f"in {span_us / steps / 1e3:.3f} ms of span ({sum(gaps) / steps / 1e3:.3f} ms between kernels)"
    ]
    by_kind: dict[str, list[tuple[float, float]]] = {}
    for span, time_us, gap in zip(ordered, added, gaps, strict=True):
        by_kind.setdefault(span.name[:90], []).append((time_us, gap))
    lines.append("kernel time a step (past the previous kernel's end), calls, each, median gap before:")
    for name, values in sorted(by_kind.items(), key=lambda kv: -sum(t for t, _ in kv[1]))[:top]:
        total = sum(t for t, _ in values) / steps
        calls = len(values) / steps
        gap = statistics.median(g for _, g in values)
        lines.append(
            f"  {total / 1e3:7.3f} ms  {calls:6.1f}x  {total / calls:7.2f} us  +{gap:.2f} us  {name}"
        )
    if not window:
        return lines
    middle = len(ordered) // 2
    lines.append(f"{window} consecutive kernels: gap before, time past the previous end, name")
    for span, time_us, gap in list(zip(ordered, added, gaps, strict=True))[middle : middle + window]:
        lines.append(f"  +{gap:.2f} us  {time_us:7.2f} us  {span.name[:80]}")
    return lines


def _engine_step_period(engine: EngineCore, prompt: list[int], overlap: bool, steps: int) -> float:
    """Median time between consecutive tokens of one request in the engine's own step loop."""
    engine.overlap = overlap
    request = engine.add_request(
        prompt, SamplingParams(temperature=0.0, max_tokens=steps + 1, ignore_eos=True)
    )
    while engine.has_unfinished:
        engine.step()
    times = request.times.tokens
    return statistics.median(b - a for a, b in itertools.pairwise(times))


def _gemv_time(model: torch.nn.Module, device: torch.device, repeat: int = 20) -> float:
    """GPU time of every Linear of one decode step at batch 1: cuBLAS's share of the step."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    x = {m.in_features: torch.randn(1, m.in_features, dtype=torch.bfloat16, device=device) for m in linears}
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    with torch.inference_mode():
        for m in linears:
            m(x[m.in_features])
        start.record()
        for _ in range(repeat):
            for m in linears:
                m(x[m.in_features])
        end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / 1000 / repeat


if __name__ == "__main__":
    main()
