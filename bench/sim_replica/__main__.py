"""Command line: start N simulated replicas on consecutive ports in one process."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path
from typing import Final

from aiohttp import web

from bench.sim_replica.engine import SimEngine
from bench.sim_replica.server import ServedModel, SimReplicaServer
from bench.sim_replica.words import WordVocab
from bench.simulator.config import DEFAULT_NUM_BLOCKS, ReplicaConfig
from bench.simulator.latency import H100_80GB, H200, LatencyModel
from gateway.text import GatewayTokenizer

LATENCY_MODELS: Final[dict[str, LatencyModel]] = {"h100-llama3-8b": H100_80GB, "h200-llama3-8b": H200}
MODEL_NAME = "sim-llama3-8b"


def _default_folder() -> Path:
    from engine.model_store import ensure_default_model

    return ensure_default_model()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.sim_replica", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="the first replica's port")
    parser.add_argument("--replicas", type=int, default=1, help="replicas on port, port+1, ...")
    parser.add_argument("--capacity-blocks", type=int, default=DEFAULT_NUM_BLOCKS, help="KV blocks each")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-batched-tokens", type=int, default=8192)
    parser.add_argument("--latency-model", choices=sorted(LATENCY_MODELS), default="h100-llama3-8b")
    parser.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="wall seconds per simulated second (4: the simulated GPU runs 4x slower than real time)",
    )
    parser.add_argument(
        "--tokens-per-frame", type=int, default=1, help="decode tokens sent together (the first at once)"
    )
    parser.add_argument("--model-folder", default=None, help="tokenizer folder (default: the embedded model)")
    parser.add_argument("--model-name", default=MODEL_NAME)
    parser.add_argument("--max-model-len", type=int, default=32768)
    parser.add_argument("--heartbeat-s", type=float, default=1.0)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    if args.replicas < 1 or args.capacity_blocks < 1 or args.time_scale <= 0:
        parser.error("--replicas, --capacity-blocks and --time-scale must be positive")
    return args


async def serve(args: argparse.Namespace) -> None:
    folder = Path(args.model_folder) if args.model_folder else _default_folder()
    tokenizer = GatewayTokenizer(folder)
    model = ServedModel(
        name=args.model_name,
        model_id=args.model_name,
        folder=str(folder),
        max_model_len=args.max_model_len,
        default_max_tokens=256,
        heartbeat_s=args.heartbeat_s,
        tokenizer=tokenizer,
        words=WordVocab(tokenizer.tokenizer),
    )
    config = ReplicaConfig(
        num_blocks=args.capacity_blocks,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_batched_tokens=args.max_batched_tokens,
        model_id=args.model_name,
    )
    latency = LATENCY_MODELS[args.latency_model]
    runners: list[web.AppRunner] = []
    engines: list[SimEngine] = []
    for i in range(args.replicas):
        engine = SimEngine(i, config, latency, args.time_scale, args.tokens_per_frame)
        engines.append(engine)
        runner = web.AppRunner(
            SimReplicaServer(engine, model).app(), access_log=None, handler_cancellation=True
        )
        await runner.setup()
        await web.TCPSite(runner, args.host, args.port + i, shutdown_timeout=1.0).start()
        runners.append(runner)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"{args.replicas} simulated replicas on {args.host}:{args.port}..{args.port + args.replicas - 1}")
    await stop.wait()
    for engine in engines:
        await engine.close()
    for runner in runners:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    try:
        import uvloop

        uvloop.run(serve(args))
    except ImportError:
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()
