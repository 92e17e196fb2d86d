"""Real replicas on GPUs behind the gateway: routing policies side by side, each run beside the
routing simulator's prediction for the same trace (issue 8: the 2-GPU run and the model check).

    python -m bench.gpu_cluster --gpus 0,1 --shape llama3-8b --tokenizer DIR --out DIR

One replica per GPU serves a real model shape with random weights (`--load-format dummy`; a
model folder of config.json + the tokenizer's files, so nothing is downloaded); its vocabulary
is the tokenizer's, since the gateway detokenizes what the model writes. For each policy a
fresh gateway fronts the same replicas and the load driver (bench/serve) replays each trace
at the trace's own arrival times, salted per run so no run finds another's prefixes cached.
The simulator replays the same trace on as many simulated replicas with the engine's settings
(KV blocks read from the replicas' /load) and the card's latency model.

On a CPU-only machine `--cpu N` runs N replicas of the embedded model instead (to try the
script; there is no latency model for it, so the prediction columns compare with the H100's).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import msgspec

from bench.gpu_cluster_report import markdown, serving_path_ms
from bench.serve import ServeConfig, run_benchmark
from bench.workloads import generate
from bench.workloads.trace import Trace

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
# The simulator's replica settings (bench/simulator/config.py), given to the real engine too.
MAX_NUM_SEQS, MAX_BATCHED_TOKENS = 256, 8192


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """One `prefixgate.cli` process on 127.0.0.1, logging to a file."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.log = log
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "prefixgate.cli", *args, "--port", str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.loads(response.read())

    def wait_ready(self, timeout: float) -> Server:
        deadline = time.monotonic() + timeout
        answer = "no answer"
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except urllib.error.HTTPError as err:
                answer = f"{err.code} {err.read()[:300]!r}"
            except OSError as err:
                answer = repr(err)
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{self.log.name} did not come up (/health: {answer}):\n{tail}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()


# Histograms whose means split a TTFT into its layers (and the engine's step time): the
# gateway's arrival -> first frame, the replica API's arrival -> first token, the engine
# core's arrival -> first scheduling, and the model time of each engine step.
HISTOGRAMS = {
    "gateway_ttft": "prefixgate_gateway_time_to_first_token_seconds",
    "replica_ttft": "prefixgate_time_to_first_token_seconds",
    "engine_queue": "prefixgate_request_queue_time_seconds",
    "engine_step": "prefixgate_engine_step_seconds",
}


def histogram_sums(servers: list[Server]) -> dict[str, tuple[float, float]]:
    """name -> (sum of seconds, count) over the servers' /metrics, for HISTOGRAMS."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {metric: name for name, metric in HISTOGRAMS.items()}
    totals = {name: (0.0, 0.0) for name in HISTOGRAMS}
    for server in servers:
        with urllib.request.urlopen(server.url + "/metrics", timeout=10) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            name = wanted.get(family.name)
            if name is None:
                continue
            total, count = totals[name]
            for sample in family.samples:
                if sample.name.endswith("_sum"):
                    total += sample.value
                elif sample.name.endswith("_count"):
                    count += sample.value
            totals[name] = (total, count)
    return totals


def layer_means_ms(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
) -> dict[str, float]:
    out = {}
    for name in HISTOGRAMS:
        total = after[name][0] - before[name][0]
        count = after[name][1] - before[name][1]
        out[f"{name}_mean_ms"] = total / count * 1e3 if count else 0.0
        if name == "engine_step":
            out["engine_steps"] = count
    return out


def model_folder(shape: str, tokenizer: Path, into: Path) -> Path:
    """config.json of `shape` with the tokenizer's vocabulary and special ids, plus its files."""
    from transformers import AutoTokenizer

    from bench.shapes import SHAPES

    config_class, fields = SHAPES[shape]
    vocab = AutoTokenizer.from_pretrained(tokenizer)
    options = {
        **fields,
        "vocab_size": len(vocab),
        "bos_token_id": vocab.bos_token_id,
        "eos_token_id": vocab.eos_token_id,
    }
    folder = into / f"{shape}-dummy"
    folder.mkdir(parents=True, exist_ok=True)
    config_class(**options).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (tokenizer / name).is_file():
            shutil.copy(tokenizer / name, folder / name)
    return folder


def traces(scale: float, seed: int, tiny: bool = False) -> dict[str, Trace]:
    """The agent and RAG traces of README's 8-replica runs, scaled to `scale` of their load
    (`tiny`: a few short requests, to try the script on a CPU)."""
    if tiny:
        return {
            "agent": generate(
                "agent",
                seed=seed,
                num_tasks=3,
                task_rate=1.0,
                system_prompt_len=64,
                tool_schema_len=128,
                task_len_mean=32.0,
                tool_output_mean=32.0,
                step_output_mean=8.0,
                max_steps=3,
                min_steps=2,
                subagent_prob=0.0,
            ),
            "rag": generate(
                "rag",
                seed=seed,
                num_requests=8,
                request_rate=2.0,
                document_len_mean=64.0,
                instructions_len=32,
            ),
        }
    return {
        "agent": generate("agent", seed=seed, num_tasks=int(200 * scale), task_rate=16.0 * scale),
        "rag": generate("rag", seed=seed, num_requests=int(1000 * scale), request_rate=120.0 * scale),
    }


def predict(trace: Trace, policy: str, replicas: int, num_blocks: int, card: str) -> dict[str, float]:
    from bench.simulator.config import ReplicaConfig
    from bench.simulator.latency import CARDS
    from bench.simulator.sim import PreparedTrace, SimulationConfig, simulate

    replica = ReplicaConfig(
        num_blocks=num_blocks, max_num_seqs=MAX_NUM_SEQS, max_batched_tokens=MAX_BATCHED_TOKENS
    )
    summary = simulate(
        PreparedTrace(trace),
        SimulationConfig(num_replicas=replicas, policy=policy, replica=replica, latency=CARDS[card]),
    )
    steps = sum(r.steps for r in summary.replicas)
    busy_s = sum(r.busy_fraction for r in summary.replicas) * summary.duration_s
    return {
        "request_throughput": summary.request_throughput,
        "output_throughput": summary.output_throughput,
        "ttft_p50_ms": summary.ttft_ms.median,
        "ttft_p90_ms": summary.ttft_ms.p90,
        "ttft_mean_ms": summary.ttft_ms.mean,
        "tpot_p50_ms": summary.tpot_ms.median,
        "engine_step_mean_ms": busy_s / steps * 1e3 if steps else 0.0,
        "engine_steps": steps,
        "hit_rate": summary.delivered_hit_rate,
    }


def measured(result: Any) -> dict[str, float]:
    m = result.metrics
    return {
        "completed": m.completed,
        "failed": m.failed,
        "request_throughput": m.request_throughput,
        "output_throughput": m.output_throughput,
        "ttft_p50_ms": m.ttft_ms.median,
        "ttft_p90_ms": m.ttft_ms.p90,
        "ttft_mean_ms": m.ttft_ms.mean,
        "tpot_p50_ms": m.tpot_ms.median,
        "hit_rate": result.cache.hit_rate,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", default="0,1", help="one replica per GPU id")
    parser.add_argument("--cpu", type=int, default=0, help="N CPU replicas of the embedded model instead")
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--tokenizer", default=".whl/tokenizer", help="a folder with tokenizer.json")
    parser.add_argument("--policies", default="kv_aware,round_robin")
    parser.add_argument("--workloads", default="agent,rag")
    parser.add_argument("--scale", type=float, default=0.25, help="share of the 8-replica traces' load")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-output-len", type=int, default=None, help="cap the trace's output lengths")
    parser.add_argument("--card", default=None, help="latency model: h100 or h200 (default: detected)")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument(
        "--step-logs",
        action="store_true",
        help="log every engine step (engine/step_log.py) for bench.step_fit",
    )
    parser.add_argument(
        "--serving-path-from",
        default=None,
        help="a calibration run's report: its serving path (serving_path_ms)",
    )
    parser.add_argument("--render", default=None, help="only re-render this report's markdown (no GPU)")
    parser.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        help="an extra `prefixgate engine` flag for every replica (repeatable): --engine-arg=--no-overlap",
    )
    args = parser.parse_args(argv)
    serving_path = None
    if args.serving_path_from:
        serving_path = serving_path_ms(json.loads(Path(args.serving_path_from).read_text()))
    if args.render:
        report_path = Path(args.render)
        text = markdown(json.loads(report_path.read_text())["rows"], serving_path)
        report_path.with_suffix(".md").write_text(text)
        print(text)
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-cluster-"))
    if args.cpu:
        gpus: list[str] = []
        folder = "default"
        engine = ["--device", "cpu", "--num-blocks", "4096"]
        envs = [{"OMP_NUM_THREADS": "1"}] * args.cpu
        card, device = args.card or "h100", "cpu"
    else:
        import torch

        gpus = [g for g in args.gpus.split(",") if g]
        folder = str(model_folder(args.shape, Path(args.tokenizer), work))
        engine = ["--device", "cuda", "--load-format", "dummy"]
        envs = [{"CUDA_VISIBLE_DEVICES": g} for g in gpus]
        device = torch.cuda.get_device_name(0)
        card = args.card or ("h200" if "H200" in device else "h100")
    engine += ["--max-num-seqs", str(MAX_NUM_SEQS), "--max-batched-tokens", str(MAX_BATCHED_TOKENS)]
    engine += ["--log-level", "warning", *args.engine_arg]

    all_traces = traces(args.scale, args.seed, tiny=bool(args.cpu))
    stem = f"gpu-cluster-{len(envs)}x-{'cpu' if args.cpu else card}-{args.shape}"
    step_logs = [out / f"{stem}-steps-replica{i}.jsonl" for i in range(len(envs))] if args.step_logs else []
    for path in step_logs:
        path.unlink(missing_ok=True)
    replicas = [
        Server(
            ["engine", "--model", folder, *engine, *(["--step-log", str(step_logs[i])] if step_logs else [])],
            work / f"replica{i}.log",
            env,
        )
        for i, env in enumerate(envs)
    ]
    rows: list[dict[str, Any]] = []
    try:
        for replica in replicas:
            replica.wait_ready(900)
        num_blocks = min(r.get("/load")["engine"]["num_blocks"] for r in replicas)
        print(
            f"{len(replicas)} replicas of {args.shape if not args.cpu else 'SmolLM2'} on {device}, "
            f"{num_blocks} KV blocks each",
            flush=True,
        )
        salt = 0
        for policy in args.policies.split(","):
            gateway_args = ["gateway", "--policy", policy, "--log-level", "info"]
            for replica in replicas:
                gateway_args += ["--replica", replica.url]
            gateway = Server(gateway_args, work / f"gateway-{policy}.log")
            try:
                gateway.wait_ready(180)
            except RuntimeError:
                for replica in replicas:
                    print(replica.url, replica.get("/load"), flush=True)
                raise
            try:
                for name in args.workloads.split(","):
                    trace = all_traces[name]
                    salt += 1
                    config = ServeConfig(
                        base_url=gateway.url,
                        label=policy,
                        key_salt=salt,
                        tokenizer=folder if not args.cpu else None,
                        progress=False,
                        keep_requests=False,
                        max_output_len=args.max_output_len,
                    )
                    before = histogram_sums([gateway, *replicas])
                    started, started_at = time.perf_counter(), time.time()
                    result = run_benchmark(trace, config)
                    wall_s = time.perf_counter() - started
                    layers = layer_means_ms(before, histogram_sums([gateway, *replicas]))
                    row = {
                        "workload": name,
                        "policy": policy,
                        "requests": len(trace.requests),
                        "wall_s": wall_s,
                        "window": [started_at, time.time()],  # wall clock: the step logs' steps of this run
                        "measured": {**measured(result), **layers},
                        "predicted": predict(trace, policy, len(replicas), num_blocks, card),
                        "errors": result.errors[:5],
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            finally:
                gateway.stop()
    finally:
        for replica in replicas:
            replica.stop()
    report = {
        "device": device,
        "card_model": card,
        "shape": args.shape,
        "replicas": len(replicas),
        "num_blocks": num_blocks,
        "scale": args.scale,
        "seed": args.seed,
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
        "step_logs": [path.name for path in step_logs],
    }
    (out / f"{stem}.json").write_bytes(msgspec.json.format(msgspec.json.encode(report)))
    (out / f"{stem}.md").write_text(markdown(rows, serving_path))
    print(markdown(rows, serving_path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
