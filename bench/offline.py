"""Offline engine benchmark on a GPU, with transformers measured beside it in the same process.

    python -m bench.offline --shape llama3-8b --out bench/results

Random-weight models of real shapes are built on the device from a config (speed does not
depend on weight values, and no download is needed). Scenarios, each reported next to its
peer and the card's name:

- decode_b1: batch-1 decode, 512-token prompt, 128 new tokens, ms/token against the roofline
  (weight bytes read per step / copy bandwidth measured in this run) and transformers `generate`.
- decode_batches: decode steps of 2, 4, 8 and 16 sequences (512-token prompts, 64 new tokens),
  ms a step; no peer, no target.
- shared_prefix: 8 groups x 32 requests, 2,048-token group prefix + 128 unique tokens, 128
  output tokens, EOS ignored: output tokens/s; peer transformers `generate_batch`.
- sharegpt_like: 500 requests at once (after one untimed pass of another 500), input/output
  lengths drawn around ShareGPT's means (~200 in, ~180 out): requests/s; peer the published
  vLLM 0.6 figure (37 req/s, Llama-3-8B, H100).
- cached_prefix_ttft: TTFT of an 8,192-token cached prefix + 128 new tokens, against a bare
  128-token prompt (the two in turns, the minimum of five each) and the same 8,320 tokens cold.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.gpu_engine import (
    build_engine,
    copy_bandwidth,
    random_prompt,
    run_to_completion,
    warm_up,
    weight_bytes_per_step,
)
from bench.gpu_peers import transformers_generate_batch, transformers_generate_ms_per_token
from bench.shapes import SHAPES
from engine.core import EngineCore
from engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class Result:
    scenario: str
    metric: str
    ours: float
    peer: float | None
    peer_name: str
    target: str
    extra: dict[str, Any]


def decode_b1(engine: EngineCore, bandwidth: float, shape: str, peers: bool) -> Result:
    rng = random.Random(1)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)
    engine.add_request(random_prompt(rng, 512, vocab), SamplingParams(max_tokens=4, ignore_eos=True))
    run_to_completion(engine)  # warm-up
    prompt = random_prompt(rng, 512, vocab)

    def ms_per_token(overlap: bool) -> float:
        engine.overlap = overlap
        request = engine.add_request(prompt, params)
        run_to_completion(engine)
        times = request.times.tokens
        return (times[-1] - times[0]) / (len(times) - 1) * 1000

    default = engine.overlap
    # Side by side: the engine as configured, then with the other overlap setting.
    measured = ms_per_token(default)
    other = ms_per_token(not default)
    engine.overlap = default
    roofline_ms = weight_bytes_per_step(engine.model_config) / bandwidth * 1000
    peer = transformers_generate_ms_per_token(shape, prompt, 128) if peers else None
    return Result(
        "decode_b1",
        "ms/token",
        measured,
        peer,
        "transformers generate",
        "<= 1.15x roofline",
        {
            "roofline_ms": roofline_ms,
            "x_roofline": measured / roofline_ms,
            "overlap": float(default),
            f"ms_per_token_overlap_{'off' if default else 'on'}": other,
        },
    )


def decode_batches(engine: EngineCore, bandwidth: float) -> Result:
    """Decode steps of 2-16 sequences (512-token prompts, 64 new tokens each, greedy): the
    batches an agent's parallel tool calls or a handful of users make, which take the same
    skinny-matmul paths as batch 1 (engine/skinny.py), and each reads the weights once too."""
    rng = random.Random(5)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    ms_per_step = {}
    for batch in (2, 4, 8, 16):
        requests = [engine.add_request(random_prompt(rng, 512, vocab), params) for _ in range(batch)]
        run_to_completion(engine)
        times = requests[0].times.tokens
        ms_per_step[batch] = (times[-1] - times[0]) / (len(times) - 1) * 1000
    roofline_ms = weight_bytes_per_step(engine.model_config) / bandwidth * 1000
    return Result(
        "decode_batches",
        "ms/step at batch 4",
        ms_per_step[4],
        None,
        "-",
        "-",
        {"roofline_ms": roofline_ms, **{f"ms_per_step_batch_{b}": ms for b, ms in ms_per_step.items()}},
    )


def _shared_prefix_prompts(vocab: int, groups: int, per_group: int) -> list[list[int]]:
    rng = random.Random(2)
    prompts = []
    for _ in range(groups):
        prefix = random_prompt(rng, 2048, vocab)
        prompts += [prefix + random_prompt(rng, 128, vocab) for _ in range(per_group)]
    return prompts


def _throughput(engine: EngineCore, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    for prompt in prompts:
        engine.add_request(prompt, params)
    seconds = run_to_completion(engine)
    return len(prompts) * new_tokens / seconds, seconds


def shared_prefix(engine: EngineCore, shape: str, peers: bool, peer_groups: int) -> Result:
    """The whole workload (8 x 32) for ours; the peer, which may take minutes, runs the first
    peer_groups groups, and ours runs that same subset again (fresh prefixes) beside it."""
    groups, per_group = 8, 32
    vocab = engine.model_config.vocab_size
    throughput, seconds = _throughput(engine, _shared_prefix_prompts(vocab, groups, per_group), 128)
    extra: dict[str, Any] = {"seconds": seconds, "requests": groups * per_group}
    peer, name = None, "transformers generate_batch"
    if peers and peer_groups:
        if engine.tree is not None:
            engine.tree.clear()  # the subset repeats the first prompts: run it cold, as the peer does
        subset = _shared_prefix_prompts(vocab, peer_groups, per_group)
        extra["ours_on_peer_subset_tok_s"], _ = _throughput(engine, subset, 128)
        measured = transformers_generate_batch(shape, subset, 128)
        if measured is not None:
            peer = measured["output_tokens_per_s"]
            name += f" ({measured['settings']}; {peer_groups} of {groups} groups)"
    return Result("shared_prefix", "output tok/s", throughput, peer, name, ">= 5,700", extra)


def _add_sharegpt_requests(engine: EngineCore, count: int, seed: int) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    # Lognormal lengths with ShareGPT-like means (about 200 in, 180 out) and long tails.
    inputs = [max(4, min(2048, int(rng.lognormvariate(4.9, 0.8)))) for _ in range(count)]
    outputs = [max(4, min(1024, int(rng.lognormvariate(4.8, 0.8)))) for _ in range(count)]
    for length, out in zip(inputs, outputs, strict=True):
        engine.add_request(random_prompt(rng, length, vocab), SamplingParams(max_tokens=out, ignore_eos=True))
    return inputs, outputs


def sharegpt_like(engine: EngineCore, count: int = 500) -> Result:
    # One untimed pass of the same workload (other prompts, same length distribution) first:
    # the first pass after warm_up compiled Triton variants on the way and came out 15-20%
    # slower than the passes after it on one H200 (36.8 then 42.9, 46.6, 45.8 req/s).
    _add_sharegpt_requests(engine, count, seed=4)
    run_to_completion(engine)
    inputs, outputs = _add_sharegpt_requests(engine, count, seed=3)
    seconds = run_to_completion(engine)
    # The same requests again with the other overlap setting (the cache cleared: as cold).
    default = engine.overlap
    engine.overlap = not default
    if engine.tree is not None:
        engine.tree.clear()
    _add_sharegpt_requests(engine, count, seed=3)
    other_seconds = run_to_completion(engine)
    engine.overlap = default
    # And once more without the piecewise graphs (mixed steps past the two-replay split eager).
    extra: dict[str, float] = {}
    piecewise, engine.runner.piecewise = engine.runner.piecewise, None
    if piecewise is not None:
        if engine.tree is not None:
            engine.tree.clear()
        _add_sharegpt_requests(engine, count, seed=3)
        extra["req_per_s_piecewise_off"] = count / run_to_completion(engine)
        engine.runner.piecewise = piecewise
    return Result(
        "sharegpt_like",
        "requests/s",
        count / seconds,
        37.0,
        "vLLM 0.6 published (Llama-3-8B, H100)",
        ">= 37",
        {
            "seconds": seconds,
            "overlap": float(default),
            f"req_per_s_overlap_{'off' if default else 'on'}": count / other_seconds,
            "mean_input": sum(inputs) / count,
            "mean_output": sum(outputs) / count,
            "output_tok_per_s": sum(outputs) / seconds,
            **extra,
        },
    )


def _ttft(engine: EngineCore, prompt: list[int]) -> float:
    request = engine.add_request(prompt, SamplingParams(max_tokens=1, ignore_eos=True))
    run_to_completion(engine)
    assert request.times.ttft is not None
    return request.times.ttft


# Cached and bare TTFTs measured, in turns (the minimum of each is the figure).
TTFT_PAIRS = 5


def cached_prefix_ttft(engine: EngineCore) -> Result:
    rng = random.Random(4)
    vocab = engine.model_config.vocab_size
    _ttft(engine, random_prompt(rng, 256, vocab))  # warm-up
    prefix = random_prompt(rng, 8192, vocab)
    _ttft(engine, prefix + random_prompt(rng, 16, vocab))  # puts the prefix in the cache
    # Cached and bare prompts take turns, so drift in the card or the host over the run (a
    # clock settling after the cold prefill above, say) reaches both sides of the ratio.
    cached_runs: list[float] = []
    bare_runs: list[float] = []
    for _ in range(TTFT_PAIRS):
        cached_runs.append(_ttft(engine, prefix + random_prompt(rng, 128, vocab)))
        bare_runs.append(_ttft(engine, random_prompt(rng, 128, vocab)))
    cached, bare = min(cached_runs), min(bare_runs)
    cold = min(_ttft(engine, random_prompt(rng, 8320, vocab)) for _ in range(2))
    return Result(
        "cached_prefix_ttft",
        "TTFT ms (8,192 cached + 128 new)",
        cached * 1000,
        cold * 1000,
        "the same 8,320 tokens cold (ours)",
        "<= 1.3x bare 128-token TTFT, >= 20x faster than cold",
        {
            "bare_128_ms": bare * 1000,
            "x_bare": cached / bare,
            "cold_over_cached": cold / cached,
            "cached_median_ms": statistics.median(cached_runs) * 1000,
            "bare_median_ms": statistics.median(bare_runs) * 1000,
        },
    )


SCENARIOS = ("decode_b1", "decode_batches", "shared_prefix", "sharegpt_like", "cached_prefix_ttft")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--no-peers", action="store_true", help="skip the transformers peers")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--num-blocks", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-batched-tokens", type=int, default=8192)
    parser.add_argument(
        "--kv-fraction", type=float, default=0.45, help="of free GPU memory, leaving room for peers"
    )
    parser.add_argument("--peer-groups", type=int, default=2, help="shared-prefix groups the peer runs")
    parser.add_argument("--no-skinny", action="store_true", help="cuBLAS for every matmul (engine/skinny.py)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.offline needs an NVIDIA GPU")
    device = torch.device("cuda")
    card = torch.cuda.get_device_name(device)
    bandwidth = copy_bandwidth(device)
    print(f"card: {card}; copy bandwidth {bandwidth / 1e12:.2f} TB/s; shape {args.shape}", flush=True)

    results: list[Result] = []
    peers = not args.no_peers
    wanted = args.scenarios.split(",")
    started = time.perf_counter()
    engine = build_engine(
        args.shape,
        device,
        num_blocks=args.num_blocks,
        max_num_seqs=args.max_num_seqs,
        max_batched_tokens=args.max_batched_tokens,
        gpu_memory_fraction=args.kv_fraction,
        skinny_matmuls=not args.no_skinny,
    )
    graphs = engine.runner.graphs
    capture = f"captured in {graphs.capture_seconds:.1f} s" if graphs else "off"
    if engine.runner.piecewise is not None:
        capture += f" (+ piecewise, {engine.runner.piecewise.capture_seconds:.1f} s)"
    print(
        f"engine ready in {time.perf_counter() - started:.1f} s: {engine.describe()}; CUDA graphs {capture}; "
        f"skinny matmuls on {', '.join(engine.skinny_matmuls) or 'none'}",
        flush=True,
    )
    warm_up(engine)
    gc.collect()
    gc.freeze()  # as a served engine core does after its warm-up (engine/server/core_process.py)
    runners: dict[str, Callable[[EngineCore], Result]] = {
        "decode_b1": lambda e: decode_b1(e, bandwidth, args.shape, peers),
        "decode_batches": lambda e: decode_batches(e, bandwidth),
        "shared_prefix": lambda e: shared_prefix(e, args.shape, peers, args.peer_groups),
        "sharegpt_like": sharegpt_like,
        "cached_prefix_ttft": cached_prefix_ttft,
    }
    for name in SCENARIOS:
        if name not in wanted:
            continue
        started = time.perf_counter()
        result = runners[name](engine)
        results.append(result)
        print(_row(result), f"({time.perf_counter() - started:.0f} s)", flush=True)
        gc.collect()
        torch.cuda.empty_cache()
    _save(results, card, bandwidth, args)


def _row(r: Result) -> str:
    peer = "-" if r.peer is None else f"{r.peer:,.2f}"
    extra = ", ".join(f"{k}={v:,.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.extra.items())
    return f"| {r.scenario} | {r.metric} | {r.ours:,.2f} | {peer} ({r.peer_name}) | {r.target} | {extra} |"


def _save(results: list[Result], card: str, bandwidth: float, args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"offline-{args.shape}-{card.replace(' ', '_')}"
    payload = {
        "card": card,
        "copy_bandwidth_tb_s": bandwidth / 1e12,
        "shape": args.shape,
        "torch": torch.__version__,
        "results": [r.__dict__ for r in results],
    }
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2))
    lines = [
        f"Card: {card}, copy bandwidth {bandwidth / 1e12:.2f} TB/s, "
        f"shape {args.shape}, torch {torch.__version__}",
        "",
        "| scenario | metric | prefixgate | peer | target | details |",
        "|---|---|---:|---|---|---|",
        *(_row(r) for r in results),
    ]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
