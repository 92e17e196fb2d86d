"""What grammar-constrained decoding costs per decode step: SmolLM2, batch 32, CPU by default.

    python -m bench.grammar_overhead [--batch 32] [--steps 24] [--rounds 3]

Runs the same 32 prompts through the engine three ways and times only the steps in which all
rows decode: no grammar; a JSON schema on every row with the mask filled on the worker thread
while the forward runs (what the engine does); and the same with the mask filled in line
before the forward (to show what the overlap saves). The schema needs a long array, so no
row completes its grammar inside the measured steps and every way keeps the full batch.
Rounds are interleaved so a noisy machine weighs on every way alike. Prints ms/step (median
over steps, then over rounds, with the rounds' range), the ratio to the plain step, the time
the grammar adds on the step's critical path in the overlapped runs (starting the fill,
waiting for it, unpacking, masking the logits, advancing the matchers; timed inside the
real steps, so it holds on a noisy machine where whole-step ratios do not), and one batch's
mask fill + unpack + apply timed on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

import engine.sampler
from engine.config import EngineConfig
from engine.core import EngineCore
from engine.llm import _load_tokenizer
from engine.model_store import resolve_model
from engine.sampling_params import Grammar, SamplingParams
from engine.structured.outputs import PendingMask
from engine.weights import load_model

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "items": {"type": "array", "items": {"type": "string"}, "minItems": 200},
    },
    "required": ["title", "items"],
    "additionalProperties": False,
}
TOPICS = ["rivers", "birds", "cities", "tools", "colours", "fruits", "planets", "poems"]


def _prompts(tokenizer: object, batch: int) -> list[list[int]]:
    out = []
    for i in range(batch):
        messages = [{"role": "user", "content": f"List {TOPICS[i % len(TOPICS)]} (set {i}) as JSON."}]
        ids = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        out.append(list(ids))
    return out


def _decode_step_ms(
    core: EngineCore, prompts: list[list[int]], grammar: Grammar | None, steps: int, tag: str
) -> list[float]:
    params = SamplingParams(temperature=0.0, max_tokens=steps + 2, ignore_eos=True, grammar=grammar)
    for i, prompt in enumerate(prompts):
        core.add_request(prompt, params, request_id=f"{tag}-{i}", detokenize=False)
    times = []
    while core.has_unfinished:
        decoding = len(core.scheduler.running) == len(prompts) and all(
            r.num_remaining_tokens == 1 for r in core.scheduler.running
        )
        start = time.perf_counter()
        core.step()
        if decoding:
            times.append((time.perf_counter() - start) * 1e3)
    assert core.structured.num_active == 0
    return times


class CriticalPath:
    """Wall time the main thread spends in grammar work, summed per step (wraps the entry points)."""

    def __init__(self, core: EngineCore) -> None:
        self.seconds = 0.0
        structured = core.structured
        self._restore = [
            (structured, "begin_step", structured.begin_step),
            (structured, "advance", structured.advance),
            (PendingMask, "blocked", PendingMask.blocked),
            (engine.sampler, "apply_blocked", engine.sampler.apply_blocked),
        ]
        for owner, name, original in self._restore:
            setattr(owner, name, self._timed(original))

    def _timed(self, original):  # type: ignore[no-untyped-def]
        def timed(*args, **kwargs):  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed

    def close(self) -> None:
        for owner, name, original in self._restore:
            setattr(owner, name, original)


def _mask_only_ms(core: EngineCore, prompts: list[list[int]], grammar: Grammar, repeat: int = 30) -> float:
    """One batch's mask fill + unpack + apply, with nothing else running."""
    from engine.scheduler import ScheduledChunk, SchedulePlan
    from engine.structured.bitmask import apply_blocked

    structured = core.structured
    requests = [
        core.add_request(p, SamplingParams(max_tokens=4, grammar=grammar), f"mask-{i}", detokenize=False)
        for i, p in enumerate(prompts)
    ]
    plan = SchedulePlan(tuple(ScheduledChunk(r, 0, r.num_tokens, True) for r in requests))
    logits = torch.randn(len(prompts), core.model_config.vocab_size, device=core.device)
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        pending = structured.begin_step(plan)
        assert pending is not None
        apply_blocked(logits, pending.blocked(core.device))
        samples.append((time.perf_counter() - start) * 1e3)
    for r in requests:
        core.abort(r.request_id)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=24, help="decode steps timed per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    folder = resolve_model("default")
    config = EngineConfig(
        device=args.device, num_blocks=1024, max_num_seqs=args.batch, max_batched_tokens=4096
    )
    device = config.torch_device()
    loaded = load_model(folder, dtype=config.torch_dtype(device), device=device)
    tokenizer = _load_tokenizer(folder)
    core = EngineCore(config, loaded, tokenizer)
    grammar = Grammar("json_schema", json.dumps(SCHEMA))
    prompts = _prompts(tokenizer, args.batch)
    core.structured.compiler.prepare()  # the one-off tokenizer build is not a per-step cost

    ways = {"plain": None, "grammar, overlapped": grammar, "grammar, in line": grammar}
    per_way: dict[str, list[float]] = {name: [] for name in ways}
    critical_ms: list[float] = []
    _decode_step_ms(core, prompts, None, 4, "warm")
    for round_index in range(args.rounds):
        for name, way_grammar in ways.items():
            core.structured.overlap = name != "grammar, in line"
            critical = CriticalPath(core) if name == "grammar, overlapped" else None
            steps_before = core.stats.steps
            times = _decode_step_ms(core, prompts, way_grammar, args.steps, f"{round_index}-{name}")
            if critical is not None:
                critical.close()
                critical_ms.append(critical.seconds * 1e3 / (core.stats.steps - steps_before))
            per_way[name].append(statistics.median(times))
    core.structured.overlap = True
    mask_ms = _mask_only_ms(core, prompts, grammar)

    plain = statistics.median(per_way["plain"])
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    )
    if device.type == "cuda":
        machine = f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    print(
        f"SmolLM2-135M on {device} ({machine}), batch {args.batch}, {args.steps} decode steps x {args.rounds}"
    )
    print("| way | ms/step (rounds' range) | vs plain |")
    print("|---|---:|---:|")
    for name in ways:
        ms = statistics.median(per_way[name])
        spread = f"{min(per_way[name]):.1f}-{max(per_way[name]):.1f}"
        print(f"| {name} | {ms:.1f} ({spread}) | {ms / plain - 1:+.1%} |")
    critical = statistics.median(critical_ms)
    print(f"| grammar work on the critical path, overlapped | {critical:.2f} | {critical / plain:.1%} |")
    print(
        f"| mask alone (fill + unpack + apply, batch {args.batch}) | {mask_ms:.2f} | {mask_ms / plain:.1%} |"
    )


if __name__ == "__main__":
    main()
