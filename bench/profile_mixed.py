"""Step time of mixed batches (a prompt chunk beside running decodes), measured and modelled.

    python -m bench.profile_mixed --shape llama3-8b

The engine replays one CUDA graph for decode-only steps and for one-sequence chunks under 512
tokens; a step that holds both (an agent's next turn arriving while others decode, the
common case on a busy replica) runs as piecewise graphs with eager attention between them
(engine/piecewise_graphs.py) up to 2,048 tokens, or eagerly above. The routing simulator's
latency model (bench/simulator/latency.py) is fitted on offline scenarios that are either
graph steps or large GPU-bound batches, so this measures what it never saw. For D running
decodes (each on `--context` tokens) and a fresh chunk of n tokens, medians of engine.step():

- decode only (graph), the decode-only batch with graphs switched off (eager), both in one
  step as the engine runs it, and the same step with graphs switched off (eager);
- for piecewise and eager steps, the host time to launch the forward (the call's return, no
  sync) and its GPU time (CUDA events): a step whose launch time matches its GPU time is
  host-bound;
- the latency model's step time for the same work, and its error.
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from bench.gpu_engine import build_engine
from bench.shapes import SHAPES
from bench.simulator.latency import CARDS, LatencyModel
from bench.simulator.step_cost import step_ms
from engine.core import EngineCore
from engine.sampling_params import SamplingParams


class ForwardClock:
    """Launch (host) time and GPU time of the forwards inside the timed steps: the model's eager
    forward, or `owner.method` (the piecewise graphs' run)."""

    def __init__(self, engine: EngineCore, owner: Any = None, method: str = "forward") -> None:
        self.model = owner if owner is not None else engine.runner.model
        self.method = method
        self.cuda = engine.device.type == "cuda"
        self.launch_s: list[float] = []
        self.events: list[tuple[Any, Any]] = []
        self._forward = getattr(self.model, method)

    def __enter__(self) -> ForwardClock:
        def timed(*args: Any, **kwargs: Any) -> Any:
            begin = end = None
            if self.cuda:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
            start = time.perf_counter()
            out = self._forward(*args, **kwargs)
            self.launch_s.append(time.perf_counter() - start)
            if self.cuda:
                end.record()
                self.events.append((begin, end))
            return out

        setattr(self.model, self.method, timed)
        return self

    def __exit__(self, *exc: object) -> None:
        delattr(self.model, self.method)  # back to the class's method

    def medians_ms(self) -> tuple[float, float]:
        if not self.launch_s:
            return 0.0, 0.0
        if self.cuda:
            torch.cuda.synchronize()
        gpu = [b.elapsed_time(e) for b, e in self.events] if self.cuda else [0.0]
        return statistics.median(self.launch_s) * 1e3, statistics.median(gpu)


def _sync(engine: EngineCore) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize()


def _timed_step(engine: EngineCore) -> float:
    _sync(engine)
    start = time.perf_counter()
    engine.step()
    _sync(engine)
    return time.perf_counter() - start


class Bench:
    def __init__(self, engine: EngineCore, context: int, repeat: int, seed: int = 0) -> None:
        self.engine = engine
        self.context = context
        self.repeat = repeat
        self.rng = random.Random(seed)
        self.vocab = engine.model_config.vocab_size

    def prompt(self, n: int) -> list[int]:
        return [self.rng.randrange(10, self.vocab - 10) for _ in range(n)]

    def start_decodes(self, count: int) -> list[Any]:
        """`count` requests past their prefill, decoding on `context`-token prompts."""
        params = SamplingParams(max_tokens=self.engine.max_model_len - self.context, ignore_eos=True)
        requests = [self.engine.add_request(self.prompt(self.context), params) for _ in range(count)]
        while any(r.num_computed_tokens < r.num_prompt_tokens for r in requests):
            self.engine.step()
        return requests

    def stop(self, requests: list[Any]) -> None:
        for request in requests:
            self.engine.abort(request.request_id)

    def decode_steps(self) -> float:
        return statistics.median(_timed_step(self.engine) for _ in range(self.repeat))

    def chunk_steps(self, n: int) -> float:
        """Steps that each admit one fresh n-token prompt (one token out) beside what runs."""
        times = []
        for _ in range(self.repeat):
            self.engine.add_request(self.prompt(n), SamplingParams(max_tokens=1, ignore_eos=True))
            times.append(_timed_step(self.engine))
        return statistics.median(times)

    def eager(self, measure: Callable[[], float]) -> tuple[float, float, float]:
        """(step ms, forward launch ms, forward GPU ms) with graphs switched off."""
        runner = self.engine.runner
        graphs, runner.graphs = runner.graphs, None
        piecewise, runner.piecewise = runner.piecewise, None
        try:
            with ForwardClock(self.engine) as clock:
                step = measure()
            launch, gpu = clock.medians_ms()
        finally:
            runner.graphs, runner.piecewise = graphs, piecewise
        return step * 1e3, launch, gpu

    def as_run(self, measure: Callable[[], float]) -> tuple[float, float, float]:
        """(step ms, launch ms, GPU ms) as the engine runs the step; launch and GPU time are
        the piecewise graphs' forward (zeros when the steps ran otherwise)."""
        runner = self.engine.runner
        if runner.piecewise is None:
            return measure() * 1e3, 0.0, 0.0
        with ForwardClock(self.engine, runner.piecewise, "run") as clock:
            step = measure()
        launch, gpu = clock.medians_ms()
        return step * 1e3, launch, gpu


def predicted_ms(model: LatencyModel, decodes: int, context: int, chunk: int) -> float:
    """The latency model's price of the step as the engine runs it (bench/simulator/step_cost.py)."""
    return step_ms(model, decodes, decodes * context, [(chunk, 0)] if chunk > 1 else [])


def _engine(args: argparse.Namespace, memory_fraction: float) -> EngineCore:
    options: dict[str, Any] = {"max_num_seqs": 256, "max_batched_tokens": 8192}
    if args.device == "cuda":
        options["gpu_memory_fraction"] = memory_fraction
    else:
        options["num_blocks"] = 4096
    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    return build_engine(args.shape, torch.device(args.device), overrides=overrides, **options)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    engine = _engine(args, memory_fraction=0.5)
    gpu = engine.device.type == "cuda"
    model = CARDS["h200" if gpu and "H200" in torch.cuda.get_device_name(engine.device) else "h100"]
    bench = Bench(engine, args.context, args.repeat)
    if engine.runner.piecewise is not None:
        pieces = engine.runner.piecewise
        print(
            f"piecewise graphs: {len(pieces.buckets)} buckets to {pieces.max_tokens} tokens, "
            f"captured in {pieces.capture_seconds:.1f} s"
        )
    rows = []
    capacity = engine.num_blocks * engine.block_size
    for decodes in args.decodes:
        # Each decode grows by a token a step; leave room for that and for the chunks.
        needed = decodes * (args.context + 64 * args.repeat) + 2 * max(args.chunks)
        if needed > capacity:
            print(f"| {decodes} | - | skipped: needs ~{needed:,} KV tokens, the pool holds {capacity:,} |")
            continue
        running = bench.start_decodes(decodes) if decodes else []
        for chunk in args.chunks:
            graph_decode = bench.decode_steps() * 1e3 if decodes else 0.0
            eager_decode = bench.eager(bench.decode_steps) if decodes else (0.0, 0.0, 0.0)
            mixed, pieces_launch, pieces_gpu = bench.as_run(functools.partial(bench.chunk_steps, chunk))
            how = engine.runner.last_step_kind
            mixed_eager, mixed_launch, mixed_gpu = bench.eager(functools.partial(bench.chunk_steps, chunk))
            rows.append(
                {
                    "decodes": decodes,
                    "chunk": chunk,
                    "decode_graph_ms": graph_decode,
                    "decode_eager_ms": eager_decode[0],
                    "decode_eager_launch_ms": eager_decode[1],
                    "decode_eager_gpu_ms": eager_decode[2],
                    "step_ms": mixed,
                    "step_how": how,
                    "step_piecewise_launch_ms": pieces_launch,
                    "step_piecewise_gpu_ms": pieces_gpu,
                    "step_eager_ms": mixed_eager,
                    "step_eager_launch_ms": mixed_launch,
                    "step_eager_gpu_ms": mixed_gpu,
                    "model_ms": predicted_ms(model, decodes, args.context, chunk),
                }
            )
            print(_row(rows[-1]), flush=True)
        bench.stop(running)
        while engine.has_unfinished:
            engine.step()
    return rows


def _row(r: dict[str, Any]) -> str:
    error = (r["model_ms"] / r["step_ms"] - 1) * 100 if r["step_ms"] else 0.0
    return (
        f"| {r['decodes']} | {r['chunk']} | {r['decode_graph_ms']:.2f} | {r['decode_eager_ms']:.2f} "
        f"({r['decode_eager_launch_ms']:.2f} / {r['decode_eager_gpu_ms']:.2f}) | {r['step_ms']:.2f} "
        f"({r['step_how']}; {r['step_piecewise_launch_ms']:.2f} / "
        f"{r['step_piecewise_gpu_ms']:.2f}) | {r['step_eager_ms']:.2f} ({r['step_eager_launch_ms']:.2f} / "
        f"{r['step_eager_gpu_ms']:.2f}) | {r['model_ms']:.2f} ({error:+.0f}%) |"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--layers", type=int, default=0, help="override the layer count (CPU tries)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--decodes", type=int, nargs="+", default=[0, 4, 16, 64])
    parser.add_argument("--chunks", type=int, nargs="+", default=[32, 128, 480, 2048])
    parser.add_argument("--context", type=int, default=2048, help="prompt tokens of each running decode")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--cprofile", action="store_true", help="then profile the host side of eager steps")
    parser.add_argument(
        "--kernels", action="store_true", help="then a torch.profiler table of piecewise steps (first values)"
    )
    args = parser.parse_args(argv)
    card = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    print(f"card {card}, shape {args.shape}, decodes on {args.context}-token prompts; medians, ms")
    print(
        "| decodes | chunk | decode step (graph) | decode step eager (launch / GPU) "
        "| decodes + chunk step (how; piecewise launch / GPU) "
        "| the same step eager (launch / GPU) | latency model (error) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    run(args)
    if args.cprofile:
        host_profile(args)
    if args.kernels:
        kernel_profile(args)


def kernel_profile(args: argparse.Namespace) -> None:
    """GPU and host time by op of piecewise steps of the first --decodes and --chunks values."""
    from torch.profiler import ProfilerActivity, profile

    engine = _engine(args, memory_fraction=0.3)
    bench = Bench(engine, args.context, args.repeat, seed=2)
    running = bench.start_decodes(args.decodes[0])
    bench.chunk_steps(args.chunks[0])  # warm-up
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        bench.chunk_steps(args.chunks[0])
    bench.stop(running)
    print(
        f"torch.profiler, {args.repeat} steps of {args.decodes[0]} decodes + a {args.chunks[0]}-token chunk"
    )
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=20))


def host_profile(args: argparse.Namespace) -> None:
    """cProfile of eager steps of the first --decodes and --chunks values: where launch time goes."""
    import cProfile
    import pstats

    engine = _engine(args, memory_fraction=0.3)
    bench = Bench(engine, args.context, args.repeat, seed=1)
    running = bench.start_decodes(args.decodes[0])
    profiler = cProfile.Profile()
    graphs, engine.runner.graphs = engine.runner.graphs, None
    try:
        bench.chunk_steps(args.chunks[0])  # warm-up
        profiler.enable()
        bench.chunk_steps(args.chunks[0])
        profiler.disable()
    finally:
        engine.runner.graphs = graphs
    bench.stop(running)
    chunk = args.chunks[0]
    print(f"cProfile of {args.repeat} eager steps: {args.decodes[0]} decodes + a {chunk}-token chunk")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    pstats.Stats(profiler).sort_stats("cumtime").print_stats(30)


if __name__ == "__main__":
    main()
