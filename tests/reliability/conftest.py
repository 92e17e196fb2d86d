"""One real replica (the embedded model, bench/fuzz_api.py's small settings) and one real gateway
in front of it, shared by the tests of this folder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.fuzz_api import Server, start_gateway, start_replica


@pytest.fixture(scope="session")
def fuzz_servers(
    smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, Server]]:
    logs = tmp_path_factory.mktemp("reliability")
    replica = start_replica(logs)
    try:
        gateway = start_gateway(replica, logs)
    except BaseException:
        replica.stop()
        raise
    yield replica, gateway
    gateway.stop()
    replica.stop()
