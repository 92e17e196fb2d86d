"""One real replica of the embedded model and one gateway in front of it, on 127.0.0.1, shared
by the client, LangChain and example tests (started on first use, stopped at the end)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest


def _gateway_conftest() -> ModuleType:
    # tests/gateway/conftest.py has the process helpers; "gateway" is also the package under
    # test, so it is loaded by path rather than imported by name.
    path = Path(__file__).resolve().parents[1] / "gateway" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_prefixgate_tests_procs", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


_procs = _gateway_conftest()


@pytest.fixture(scope="session")
def gateway_url(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The gateway's base URL (no /v1), in front of one replica with a 2048-block KV pool."""
    started = []
    try:
        replica_log = tmp_path_factory.mktemp("client-replica") / "engine.log"
        # Two torch threads: this replica is alone on the 2-core machine.
        replica = _procs.Proc(
            _procs.ENGINE_ARGS, _procs.free_port(), replica_log, env={"OMP_NUM_THREADS": "2"}
        )
        started.append(replica.start())
        replica.wait_ready()
        gateway_args = ["gateway", "--log-level", "warning", "--replica", replica.url]
        gateway_log = tmp_path_factory.mktemp("client-gateway") / "gateway.log"
        gateway = _procs.Proc(gateway_args, _procs.free_port(), gateway_log)
        started.append(gateway.start())
        gateway.wait_ready(60)
        yield gateway.url
    finally:
        for proc in reversed(started):
            proc.stop()
