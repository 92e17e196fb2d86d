"""Schemathesis against a real replica and a real gateway: no 5xx, no process death, no leaked block.

Starts the embedded model as a replica (`prefixgate engine`, small KV pool and context) and a
gateway in front of it, loads each one's OpenAPI schema (GET /schema/openapi.json, which
describes the msgspec request bodies; engine/server/openapi.py), and sends N generated cases
to every operation, half valid by the schema (positive) and half not (negative), the two
modes of `schemathesis run --mode all`. Every answer must be < 500, have a documented content
type and match its documented schema. Afterwards both processes must be alive and answer a
normal completion, and the replica, once idle, must pass its KV integrity check
(/debug/cache) with no block held by a request.

What is bounded, so one case takes milliseconds: generated max_tokens / max_completion_tokens
in 3..max_model_len become 2 and n / best_of in 3..128 become 2 (`_cap`); values outside
those ranges (negative, 0, past the context, 1e308, strings) go through untouched and must
get a 400. Not fuzzed: GET /kv/events (an endless stream: it would time out every case; the
tests in tests/engine/server/test_kv_events.py cover it). Gateway admin routes that change
the replica set (POST/DELETE /admin/replicas) run last, and the real replica is put back.

    .venv/bin/python -m bench.fuzz_api                # 1,000 cases per operation
    .venv/bin/python -m bench.fuzz_api --cases 50 --server replica

Prints a table per server and writes bench/results/fuzz-api-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
import hypothesis.errors
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SCHEMA_PATH = "/schema/openapi.json"
MAX_MODEL_LEN = 512
MAX_TOKENS_CAP = 2
N_CAP = 2
# A small pool (128 x 16 tokens) so that leaks and evictions show; 512 tokens of context so
# that "prompt too long" and "max_tokens too large" are cheap to reach.
REPLICA_ARGS = [
    "--num-blocks", "128", "--max-model-len", str(MAX_MODEL_LEN),
    "--default-max-tokens", str(MAX_TOKENS_CAP), "--device", "cpu",
]  # fmt: skip
SKIPPED = {("GET", "/kv/events"): "an endless NDJSON stream (tests/engine/server/test_kv_events.py)"}
CHECKS = [not_a_server_error, content_type_conformance, response_schema_conformance]
CASE_TIMEOUT_S = 60.0


# --- processes --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def get_json(self, path: str, timeout: float = 30.0) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return json.loads(response.read())

    def post_json(self, path: str, body: Any, timeout: float = 60.0) -> tuple[int, Any]:
        request = urllib.request.Request(
            self.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")

    def wait_ready(self, timeout: float = 300.0) -> Server:
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2.0) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready after {timeout} s:\n{self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def stop(self) -> int | None:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def start(name: str, args: list[str], log: Path, env_extra: dict[str, str] | None = None) -> Server:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    command = [sys.executable, "-m", "prefixgate.cli", *args, "--port", str(port), "--log-level", "warning"]
    with log.open("ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    return Server(name, process, f"http://127.0.0.1:{port}", log)


def start_replica(log_dir: Path) -> Server:
    # One torch thread: on a small shared machine two spinning threads only slow each case.
    replica = start("replica", ["engine", *REPLICA_ARGS], log_dir / "replica.log", {"OMP_NUM_THREADS": "1"})
    return replica.wait_ready()


def start_gateway(replica: Server, log_dir: Path) -> Server:
    return start("gateway", ["gateway", "--replica", replica.url], log_dir / "gateway.log").wait_ready()


# --- schemas ----------------------------------------------------------------------------


def load_schema(server: Server, vocab_size: int) -> Any:
    """The server's own schema, or (for a gateway built without one) the same schema built here."""
    try:
        raw = server.get_json(SCHEMA_PATH)
    except urllib.error.HTTPError as err:
        if server.name != "gateway" or err.code != 404:
            raise
        raw = gateway_schema_in_process()
    return schemathesis.openapi.from_dict(pin_served(raw, server, vocab_size))


def pin_served(raw: dict[str, Any], server: Server, vocab_size: int) -> dict[str, Any]:
    """Valid data names a model the server serves (or none) and token ids in its vocabulary;
    invalid data, anything else. The schema cannot know either: without this nearly every
    positive case would be a 404 or a "token id outside the vocabulary" 400."""
    names = [card["id"] for card in server.get_json("/v1/models")["data"]]
    schemas = raw.get("components", {}).get("schemas", {})
    for name in ("CompletionRequest", "GenerateRequest", "ChatCompletionRequest"):
        _limit_token_ids(schemas.get(name), vocab_size - 1)  # not answers: block hashes are ints too
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        if name in schemas:
            schemas[name]["properties"]["model"] = {"anyOf": [{"enum": names}, {"type": "null"}]}
    for parameter in raw["paths"].get("/v1/models/{model}", {}).get("get", {}).get("parameters", []):
        if parameter["name"] == "model":
            parameter["schema"] = {"type": "string", "enum": names}
    return raw


def _limit_token_ids(node: Any, largest: int) -> None:
    if isinstance(node, dict):
        items = node.get("items")
        if node.get("type") == "array" and isinstance(items, dict) and items.get("type") == "integer":
            items["maximum"] = largest
        for value in node.values():
            _limit_token_ids(value, largest)
    elif isinstance(node, list):
        for value in node:
            _limit_token_ids(value, largest)


def gateway_schema_in_process() -> dict[str, Any]:
    """What GET /schema/openapi.json would serve once gateway/app.py passes openapi_config."""
    from litestar import Litestar

    from engine.server.openapi import OPENAI_OPERATIONS, Documented, documented, openapi_config
    from gateway import admin_routes, openai_api

    operations = {**OPENAI_OPERATIONS, ("/admin/replicas", "post"): Documented(admin_routes.AddReplica)}
    app = Litestar(
        route_handlers=[*openai_api.ROUTES, *admin_routes.ROUTES],
        openapi_config=openapi_config("prefixgate gateway", operations),
    )
    return documented(app.openapi_schema.to_schema(), operations)


# --- fuzzing ----------------------------------------------------------------------------


def _cap(case: Any) -> Any:
    """Valid but slow values made fast (see the module docstring); invalid ones left alone."""
    body = case.body
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            value = body.get(key)
            if type(value) is int and MAX_TOKENS_CAP < value <= MAX_MODEL_LEN:
                body[key] = MAX_TOKENS_CAP
        n = body.get("n")
        if type(n) is int and N_CAP < n <= 128:
            body["n"] = N_CAP
            if body.get("best_of") == n:
                body["best_of"] = N_CAP
    return case


@dataclass
class OperationResult:
    operation: str
    cases: int = 0
    distinct: int = 0  # distinct requests hypothesis generated (an operation without inputs has 1)
    statuses: Counter[int] = field(default_factory=Counter)
    server_errors: int = 0
    check_failures: Counter[str] = field(default_factory=Counter)
    timeouts: int = 0
    examples: list[str] = field(default_factory=list)  # curl commands of failing cases, a few
    seconds: float = 0.0
    slowest_s: float = 0.0
    slowest: str = ""  # the slowest case, as curl
    modes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["statuses"] = {str(k): v for k, v in sorted(self.statuses.items())}
        out["check_failures"] = dict(self.check_failures)
        return out


def _failure_names(exc: BaseException) -> list[str]:
    inner = getattr(exc, "exceptions", None)
    if inner:
        return [name for e in inner for name in _failure_names(e)]
    return [getattr(exc, "title", None) or type(exc).__name__]


def _send(operation: Any, case: Any, server: Server, result: OperationResult) -> None:
    result.cases += 1
    started = time.monotonic()
    try:
        response = case.call(base_url=server.url, timeout=CASE_TIMEOUT_S)
    except Exception as err:  # a timeout or a dropped connection: as bad as a 5xx
        result.timeouts += 1
        _remember(result, case, server, f"{type(err).__name__}: {err}")
        return
    took = time.monotonic() - started
    if took > result.slowest_s:
        result.slowest_s = round(took, 2)
        result.slowest = f"{response.status_code}: {case.as_curl_command(base_url=server.url)[:2000]}"
    result.statuses[response.status_code] += 1
    if response.status_code >= 500:
        result.server_errors += 1
    try:
        case.validate_response(response, checks=CHECKS)
    except (Exception, BaseExceptionGroup) as exc:  # schemathesis' FailureGroup is a BaseExceptionGroup
        names = _failure_names(exc)
        result.check_failures.update(names)
        why = str(exc)[:600]
        _remember(result, case, server, f"{response.status_code} {names}: {why}\n{response.text[:300]}")


def _remember(result: OperationResult, case: Any, server: Server, what: str) -> None:
    if len(result.examples) < 5:
        result.examples.append(f"{what}\n  {case.as_curl_command(base_url=server.url)}")


def fuzz_operation(operation: Any, server: Server, cases: int) -> OperationResult:
    result = OperationResult(operation.label)
    started = time.monotonic()
    by_mode = []
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        try:
            by_mode.append((mode, operation.as_strategy(generation_mode=mode).map(_cap)))
        except Exception:  # nothing to negate in an operation without inputs
            continue
    seen: set[str] = set()
    for i, (mode, strategy) in enumerate(by_mode):
        budget = cases // len(by_mode) + (cases % len(by_mode) if i == 0 else 0)
        if _fuzz_mode(operation, strategy, server, result, budget, seen):
            result.modes.append(mode.value)
    if result.cases < cases and by_mode:  # no negative data to make: the rest is positive
        _fuzz_mode(operation, by_mode[0][1], server, result, cases - result.cases, seen)
    result.distinct = len(seen)
    result.seconds = round(time.monotonic() - started, 1)
    return result


def _fuzz_mode(
    operation: Any, strategy: Any, server: Server, result: OperationResult, budget: int, seen: set[str]
) -> bool:
    """False when the strategy can make no case at all (negative data for an operation
    without inputs)."""
    goal = result.cases + budget

    @hypothesis.given(strategy)
    @hypothesis.settings(
        max_examples=budget,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        verbosity=hypothesis.Verbosity.quiet,
    )
    def run(case: Any) -> None:
        if result.cases < goal and server.alive():
            seen.add(repr((case.path_parameters, case.query, case.headers, case.body)))
            _send(operation, case, server, result)

    # An operation with no inputs (or few) runs out of distinct requests before the budget is
    # spent: hypothesis stops, and the next run sends them again.
    while result.cases < goal and server.alive():
        sent = result.cases
        try:
            run()
        except hypothesis.errors.Unsatisfiable:
            return False
        if result.cases == sent:
            break
    return True


def fuzz_server(
    server: Server, cases: int, vocab_size: int, *, last: tuple[str, ...] = ()
) -> list[OperationResult]:
    schema = load_schema(server, vocab_size)
    operations = [r.ok() for r in schema.get_all_operations()]
    operations = [op for op in operations if (op.method.upper(), op.path) not in SKIPPED]
    operations.sort(key=lambda op: (op.path in last and op.method.upper() != "GET", op.path, op.method))
    results = []
    for operation in operations:
        result = fuzz_operation(operation, server, cases)
        results.append(result)
        print(_row(server.name, result), flush=True)
        if not server.alive():
            print(f"{server.name} died during {operation.label}:\n{server.log_tail()}", flush=True)
            break
    return results


# --- afterwards -------------------------------------------------------------------------

NORMAL_CHAT = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}


def restore_gateway(gateway: Server, replica: Server) -> None:
    """Remove replicas the admin cases added and put the real one back."""
    listed = gateway.get_json("/admin/replicas")["replicas"]
    for entry in listed:
        if entry["url"] != replica.url:
            query = urllib.parse.urlencode({"url": entry["url"]})
            request = urllib.request.Request(f"{gateway.url}/admin/replicas?{query}", method="DELETE")
            urllib.request.urlopen(request, timeout=30).close()
    if all(entry["url"] != replica.url for entry in listed):
        gateway.post_json("/admin/replicas", {"url": replica.url})
    gateway.wait_ready()


def replica_idle_state(replica: Server, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        state: dict[str, Any] = replica.get_json("/debug/cache")
        if not state["running"] and not state["waiting"] and state["in_flight"] == 0:
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"replica not idle after {timeout} s: {state}")
        time.sleep(0.2)


def final_checks(replica: Server, gateway: Server | None) -> dict[str, Any]:
    """Both alive, both answer a normal request, the replica's KV blocks all free or cached."""
    out: dict[str, Any] = {"replica_alive": replica.alive()}
    if gateway is not None:
        out["gateway_alive"] = gateway.alive()
        if gateway.alive():
            out["gateway_normal_request"] = gateway.post_json("/v1/chat/completions", NORMAL_CHAT)[0]
    if replica.alive():
        out["replica_normal_request"] = replica.post_json("/v1/chat/completions", NORMAL_CHAT)[0]
        state = replica_idle_state(replica)
        load = state["load"]
        out["integrity_error"] = state["integrity_error"]
        out["blocks"] = {k: load[k] for k in ("num_blocks", "free_blocks", "cached_blocks", "used_blocks")}
    out["ok"] = (
        out["replica_alive"]
        and out.get("replica_normal_request") == 200
        and out.get("integrity_error") is None
        and out.get("blocks", {}).get("used_blocks") == 0
        and (gateway is None or (out["gateway_alive"] and out.get("gateway_normal_request") == 200))
    )
    return out


def tracebacks(server: Server) -> int:
    return server.log.read_text(errors="replace").count("Traceback (most recent call last)")


# --- report -----------------------------------------------------------------------------

_HEADER = (
    f"{'server':8} {'operation':34} {'cases':>6} {'distinct':>8} {'5xx':>4} {'fail':>5} {'s':>6}  statuses"
)


def _row(server: str, r: OperationResult) -> str:
    statuses = " ".join(f"{s}:{c}" for s, c in sorted(r.statuses.items()))
    failed = sum(r.check_failures.values()) + r.timeouts
    return (
        f"{server:8} {r.operation:34} {r.cases:6d} {r.distinct:8d} {r.server_errors:4d} {failed:5d} "
        f"{r.seconds:6.1f}  {statuses}"
    )


def run(cases: int, servers: tuple[str, ...], log_dir: Path) -> dict[str, Any]:
    replica = start_replica(log_dir)
    gateway = start_gateway(replica, log_dir) if "gateway" in servers else None
    report: dict[str, Any] = {"cases_per_operation": cases, "servers": {}, "skipped": [
        f"{method} {path}: {why}" for (method, path), why in SKIPPED.items()
    ]}  # fmt: skip
    try:
        vocab_size = replica.get_json("/internal/info")["vocab_size"]
        print(_HEADER, flush=True)
        if "replica" in servers:
            results = fuzz_server(replica, cases, vocab_size)
            report["servers"]["replica"] = [r.to_json() for r in results]
        if gateway is not None:
            results = fuzz_server(gateway, cases, vocab_size, last=("/admin/replicas",))
            report["servers"]["gateway"] = [r.to_json() for r in results]
            if gateway.alive():
                restore_gateway(gateway, replica)
        report["after"] = final_checks(replica, gateway)
        report["tracebacks_in_logs"] = {s.name: tracebacks(s) for s in (replica, gateway) if s is not None}
    finally:
        codes = {s.name: s.stop() for s in (gateway, replica) if s is not None}
        report["exit_codes"] = codes
    every = [r for results in report["servers"].values() for r in results]
    report["ok"] = bool(
        report["after"]["ok"]
        and all(r["server_errors"] == 0 and r["timeouts"] == 0 and not r["check_failures"] for r in every)
    )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, default=1000, help="generated cases per operation")
    parser.add_argument("--server", choices=["replica", "gateway", "both"], default="both")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    servers = ("replica", "gateway") if args.server == "both" else (args.server,)
    log_dir = Path(tempfile.mkdtemp(prefix="fuzz-api-"))
    print(f"server logs in {log_dir}", flush=True)
    started = time.monotonic()
    report = run(args.cases, servers, log_dir)
    report["seconds"] = round(time.monotonic() - started, 1)
    report["machine"] = f"{platform.node()} ({os.cpu_count()} cores), {platform.python_version()}"
    report["date"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    report["schemathesis"] = schemathesis.__version__
    out = args.out or RESULTS / f"fuzz-api-{datetime.date.today().isoformat()}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["after"]), flush=True)
    print(f"ok={report['ok']}  ({report['seconds']} s)  -> {out}", flush=True)
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
