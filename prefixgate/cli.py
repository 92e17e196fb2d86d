"""`prefixgate` command line: generate (and, as they land, engine / gateway / serve / bench)."""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prefixgate", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="complete one prompt with the engine and print it")
    generate.add_argument("prompt", help="the user message (chat template applied) or raw text with --raw")
    generate.add_argument("--model", default="default", help="a local model folder, or 'default'")
    generate.add_argument("--max-tokens", type=int, default=128)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--raw", action="store_true", help="complete the text as is, no chat template")
    generate.add_argument("--device", default="auto")
    generate.add_argument("--dtype", default="auto")

    args = parser.parse_args(argv)
    if args.command == "generate":
        return _generate(args)
    parser.error(f"unknown command {args.command}")
    return 2


def _generate(args: argparse.Namespace) -> int:
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams
    from engine.weights import ModelLoadError

    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
        started = time.perf_counter()
        llm = LLM(args.model, device=args.device, dtype=args.dtype)
        print(f"prefixgate: loaded {llm.engine.describe()} in {llm.load_seconds:.2f} s", file=sys.stderr)
        if args.raw:
            prompt = llm.encode(args.prompt)
        else:
            prompt = llm.apply_chat_template([{"role": "user", "content": args.prompt}])
        chunks = llm.stream(prompt, params)
        for chunk in chunks:
            print(chunk.text, end="", flush=True)
        print()
        print(f"prefixgate: done in {time.perf_counter() - started:.2f} s", file=sys.stderr)
    except (ModelLoadError, ValueError) as err:
        print(f"prefixgate: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
