"""Real replica processes on 127.0.0.1, started with `python -m prefixgate.cli engine`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[3]
# The embedded model with a small KV pool (64 blocks x 16 = 1024 tokens), so that the
# KV-events test sees evictions and "prompt longer than the context" is cheap to send.
SMOL_ARGS = ["--num-blocks", "64"]


@dataclass
class Replica:
    process: subprocess.Popen[bytes]
    url: str
    log: Path
    health_seen: list[str]  # the /health statuses seen while it started, in order, deduplicated

    def get(self, path: str, timeout: float = 30.0) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return json.loads(response.read())

    def debug(self) -> dict[str, Any]:
        return self.get("/debug/cache")  # type: ignore[no-any-return]

    def wait_idle(self, timeout: float = 30.0) -> dict[str, Any]:
        """The debug state once nothing is running, waiting or tracked by the API process."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.debug()
            if not state["running"] and not state["waiting"] and state["in_flight"] == 0:
                return state
            if time.monotonic() > deadline:
                raise AssertionError(f"replica not idle after {timeout} s: {state}")
            time.sleep(0.1)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def stop(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_replica(args: list[str], log: Path, timeout: float = 240.0) -> Replica:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "prefixgate.cli",
        "engine",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        process = subprocess.Popen([*command, *args], stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    replica = Replica(process, f"http://127.0.0.1:{port}", log, [])
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"replica exited with {process.returncode}:\n{replica.log_tail()}")
        status = _health(replica)
        if status is not None and status not in replica.health_seen[-1:]:
            replica.health_seen.append(status)
        if status == "ready":
            return replica
        if time.monotonic() > deadline:
            replica.stop()
            raise RuntimeError(f"replica not ready after {timeout} s:\n{replica.log_tail()}")
        time.sleep(0.05)


def _health(replica: Replica) -> str | None:
    """The status /health reports (503 bodies included), or None while nothing listens."""
    try:
        return str(replica.get("/health", timeout=2.0)["status"])
    except urllib.error.HTTPError as err:
        return str(json.loads(err.read())["status"])
    except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
        return None


@pytest.fixture(scope="session")
def smol_replica(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One replica of the embedded model shared by the server tests (it takes ~15 s to start)."""
    replica = start_replica(SMOL_ARGS, tmp_path_factory.mktemp("smol-replica") / "replica.log")
    yield replica
    code = replica.stop()
    # uvicorn re-raises the signal once it has shut down gracefully, so SIGTERM is the status.
    assert code in (0, -signal.SIGTERM), f"replica exited with {code}:\n{replica.log_tail()}"


@pytest.fixture(scope="session")
def smol_tokenizer(smollm2_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def replica_factory(tmp_path_factory: pytest.TempPathFactory):
    """start(args) -> a fresh Replica; each is stopped at the end of the session if still up."""
    started: list[Replica] = []

    def start(args: list[str]) -> Replica:
        replica = start_replica(args, tmp_path_factory.mktemp("replica") / "replica.log")
        started.append(replica)
        return replica

    yield start
    for replica in started:
        replica.stop()
