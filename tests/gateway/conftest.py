"""Real processes on 127.0.0.1: engine replicas (`prefixgate.cli engine`) and gateways
(`prefixgate.cli gateway`), each logging to a file the failure message shows."""

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    args: list[str]
    port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Proc:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "prefixgate.cli", *self.args, "--port", str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=env,
            )
        return self

    def get(self, path: str, timeout: float = 10.0) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return json.loads(response.read())

    def status(self) -> int | None:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2.0) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return None

    def wait_ready(self, timeout: float = 240.0) -> Proc:
        deadline = time.monotonic() + timeout
        while self.status() != 200:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.args[0]} exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.args[0]} not ready after {timeout} s:\n{self.log_tail()}")
            time.sleep(0.1)
        return self

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


# Enough blocks for 8 agents x ~1,600 tokens on each replica twice over (round robin puts
# every agent on both), with one torch thread each so two replicas share 2 cores evenly.
ENGINE_ARGS = ["engine", "--num-blocks", "2048", "--log-level", "warning", "--device", "cpu"]
ENGINE_ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def procs(tmp_path_factory: pytest.TempPathFactory):
    """make(args, env=None) -> a started Proc; all are stopped at the end of the session."""
    made: list[Proc] = []

    def make(args: list[str], env: dict[str, str] | None = None) -> Proc:
        log = tmp_path_factory.mktemp(args[0]) / f"{args[0]}.log"
        proc = Proc(args, free_port(), log, env=env or {}).start()
        made.append(proc)
        return proc

    yield make
    for proc in made:
        proc.stop()


@pytest.fixture(scope="session")
def engine_cmd() -> tuple[list[str], dict[str, str]]:
    return ENGINE_ARGS, ENGINE_ENV


@pytest.fixture(scope="session")
def gateway_cmd():
    def args(replicas: list[Proc], policy: str = "kv_aware", extra: list[str] | None = None) -> list[str]:
        out = ["gateway", "--policy", policy, "--log-level", "warning"]
        for replica in replicas:
            out += ["--replica", replica.url]
        return [*out, *(extra or [])]

    return args
