"""`prefixgate` command line: generate, engine (and, as they land, gateway / serve / bench)."""

from __future__ import annotations

import argparse
import os
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

    engine = commands.add_parser(
        "engine", help="serve one engine replica over HTTP (OpenAI API + gateway API)"
    )
    engine.add_argument("--model", default="default", help="a local model folder, or 'default'")
    engine.add_argument("--host", default="127.0.0.1")
    engine.add_argument("--port", type=int, default=8000)
    engine.add_argument("--served-model-name", default=None, help="the model name clients send")
    engine.add_argument("--device", default="auto")
    engine.add_argument("--dtype", default="auto")
    engine.add_argument("--block-size", type=int, default=16)
    engine.add_argument("--num-blocks", type=int, default=None, help="KV pool size in blocks")
    engine.add_argument("--max-num-seqs", type=int, default=64)
    engine.add_argument("--max-batched-tokens", type=int, default=2048)
    engine.add_argument("--max-model-len", type=int, default=None)
    engine.add_argument("--no-prefix-caching", action="store_true")
    engine.add_argument(
        "--no-overlap",
        action="store_true",
        help="plan each step only after the last one's tokens are read (default on a GPU: overlap)",
    )
    engine.add_argument(
        "--enforce-eager", action="store_true", help="no CUDA graphs (every step launched kernel by kernel)"
    )
    engine.add_argument(
        "--no-piecewise-graphs",
        action="store_true",
        help="run steps that are not decode batches or one short chunk eagerly (default: graph pieces)",
    )
    engine.add_argument(
        "--load-format",
        choices=["safetensors", "dummy"],
        default="safetensors",
        help="dummy: random weights of the folder's config.json shape (benchmarks)",
    )
    engine.add_argument("--seed", type=int, default=0)
    engine.add_argument("--max-waiting", type=int, default=256, help="queued requests before 429")
    engine.add_argument("--default-max-tokens", type=int, default=256)
    engine.add_argument(
        "--drain-timeout", type=float, default=30.0, help="seconds to finish requests on exit"
    )
    engine.add_argument(
        "--core-stall-timeout",
        type=float,
        default=5.0,
        help="seconds of silence from the engine core, with work queued, before the replica reports a hang",
    )
    engine.add_argument("--log-level", default="info")
    engine.add_argument(
        "--step-log", default=None, help="append a JSON line per engine step to this file (diagnostics)"
    )

    gateway = commands.add_parser("gateway", help="route OpenAI requests to replicas by prefix cache")
    _gateway_options(gateway)
    gateway.add_argument("--replica", action="append", default=[], help="an engine replica URL (repeatable)")
    gateway.add_argument(
        "--foreign-replica", action="append", default=[], help="an OpenAI-compatible URL without KV events"
    )

    serve = commands.add_parser("serve", help="start local replicas and a gateway in front of them")
    _gateway_options(serve)
    serve.add_argument("--replicas", type=int, default=2, help="replicas on the CPU (without --gpus)")
    serve.add_argument("--gpus", default="", help="comma-separated GPU ids: one replica per GPU")
    serve.add_argument("--model", default="default", help="a local model folder, or 'default'")
    serve.add_argument("--num-blocks", type=int, default=None, help="KV pool size in blocks, per replica")
    serve.add_argument("--engine-arg", action="append", default=[], help="passed on to each replica")

    from bench.serve.cli import add_serve_commands, run_serve_bench
    from bench.simulator.cli import add_bench_commands, run_bench

    add_serve_commands(add_bench_commands(commands))

    args = parser.parse_args(argv)
    if args.command == "generate":
        return _generate(args)
    if args.command == "engine":
        return _engine(args)
    if args.command in ("gateway", "serve"):
        return _gateway(args)
    if args.command == "bench":
        if args.bench_command in ("serve", "plot"):
            return run_serve_bench(args)
        return run_bench(args)
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


def _engine(args: argparse.Namespace) -> int:
    from engine.config import EngineConfig
    from engine.server.config import ServerConfig
    from engine.server.serve import run
    from engine.weights import ModelLoadError

    try:
        config = ServerConfig(
            engine=EngineConfig(
                model=args.model,
                device=args.device,
                dtype=args.dtype,
                block_size=args.block_size,
                num_blocks=args.num_blocks,
                max_num_seqs=args.max_num_seqs,
                max_batched_tokens=args.max_batched_tokens,
                max_model_len=args.max_model_len,
                enable_prefix_caching=not args.no_prefix_caching,
                overlap_scheduling=False if args.no_overlap else None,
                cuda_graphs=not args.enforce_eager,
                piecewise_graphs=not args.no_piecewise_graphs,
                seed=args.seed,
                load_format=args.load_format,
            ),
            host=args.host,
            port=args.port,
            served_model_name=args.served_model_name,
            max_waiting=args.max_waiting,
            default_max_tokens=args.default_max_tokens,
            drain_timeout_s=args.drain_timeout,
            core_stall_s=args.core_stall_timeout,
            log_level=args.log_level.lower(),
            step_log=args.step_log,
        )
        run(config)
    except (ModelLoadError, ValueError) as err:
        print(f"prefixgate: error: {err}", file=sys.stderr)
        return 2
    return 0


def _gateway_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--policy", default="kv_aware", help="kv_aware, round_robin, least_load, ...")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder, if not on the replicas' host")
    parser.add_argument(
        "--liveness-timeout",
        type=float,
        default=5.0,
        help="seconds of /kv/events silence that mark a replica hung",
    )
    parser.add_argument(
        "--upstream-idle-timeout",
        type=float,
        default=300.0,
        help="seconds without a byte from a replica before its request is failed",
    )
    parser.add_argument(
        "--api-keys",
        default=None,
        metavar="FILE",
        help="JSON or TOML: keys = {KEY: TENANT}, optional tenants = {TENANT: {max_in_flight = N}} "
        "and salt_secret = S; with keys (here or in env PREFIXGATE_API_KEYS='key=tenant,...') "
        "every /v1 request needs 'Authorization: Bearer KEY' and each tenant gets its own "
        "prefix cache; with none the gateway is open",
    )
    parser.add_argument(
        "--admin-key",
        default=os.environ.get("PREFIXGATE_ADMIN_KEY"),
        help="key for /admin routes (default: env PREFIXGATE_ADMIN_KEY); with API keys and no admin "
        "key, /admin routes answer 403",
    )
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=4096,
        help="completion requests in flight at the gateway; more get 429 with Retry-After",
    )
    parser.add_argument(
        "--max-body-bytes", type=int, default=16 << 20, help="larger request bodies get 413 (default 16 MiB)"
    )
    parser.add_argument("--log-level", default="info")


def _gateway(args: argparse.Namespace) -> int:
    from gateway.auth import load_access, parse_key_list
    from gateway.config import GatewayConfig
    from gateway.serve import run_gateway, serve

    try:
        config = GatewayConfig(
            replicas=tuple(getattr(args, "replica", ())),
            foreign_replicas=tuple(getattr(args, "foreign_replica", ())),
            host=args.host,
            port=args.port,
            policy=args.policy,
            tokenizer=args.tokenizer,
            liveness_timeout_s=args.liveness_timeout,
            upstream_idle_timeout_s=args.upstream_idle_timeout,
            log_level=args.log_level.lower(),
            api_keys_file=args.api_keys,
            api_keys=parse_key_list(os.environ.get("PREFIXGATE_API_KEYS", "")),
            admin_key=args.admin_key or None,
            salt_secret=os.environ.get("PREFIXGATE_SALT_SECRET") or None,
            max_in_flight=args.max_in_flight,
            max_body_bytes=args.max_body_bytes,
        )
        load_access(config)  # a bad keys file fails here, before any replica starts
        if args.command == "gateway":
            if not config.replicas and not config.foreign_replicas:
                print(
                    "prefixgate: note: no --replica given; add them with POST /admin/replicas",
                    file=sys.stderr,
                )
            run_gateway(config)
            return 0
        if args.replicas < 1 and not args.gpus:
            raise ValueError(f"--replicas must be at least 1, got {args.replicas}")
        engine_args = ["--model", args.model, *args.engine_arg]
        if args.num_blocks is not None:
            engine_args += ["--num-blocks", str(args.num_blocks)]
        gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
        return serve(config, args.replicas, gpus, engine_args)
    except ValueError as err:
        print(f"prefixgate: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
