"""The soak (bench/soak.py), short: a real gateway and two real replicas of the embedded model,
80 mixed requests (aborts, disconnects, 400s, 404s, n > 1, stop strings, direct
requests), then the same integrity and accounting checks the long run makes. RSS growth and
speed are only reported here: they need the long run (`python -m bench.soak`)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from bench.soak import Soak, SoakConfig, print_summary
from bench.soak_requests import KINDS

pytestmark = pytest.mark.slow


def test_short_soak_leaves_every_replica_consistent(smollm2_dir: Path, tmp_path: Path) -> None:
    # 64 blocks of 16 tokens per replica: 80 requests evict on both (96 was too close: in one
    # CI run the replica given fewer requests stored 86 blocks and evicted none).
    config = SoakConfig(
        requests=80, concurrency=8, num_blocks=64, max_rss_growth=None, log_dir=str(tmp_path / "logs")
    )
    report = asyncio.run(Soak(config).run())
    print_summary(report)
    (tmp_path / "soak.json").write_text(json.dumps(report))

    failed = [c for c in report["checks"] if not c["passed"]]
    assert not failed, json.dumps(failed, indent=1)[:4000]
    assert report["passed"]
    names = {c["check"] for c in report["checks"]}
    for replica in ("replica0", "replica1"):
        assert f"{replica}: integrity check passes" in names
        assert f"{replica}: /kv/events copy equals the cache" in names
        assert f"{replica}: blocks were evicted" in names
    assert "gateway in-flight gauge is 0 for every replica" in names

    kinds = report["kinds"]
    assert set(kinds) == set(KINDS)
    assert sum(row["count"] for row in kinds.values()) == config.requests
    assert all(row["count"] >= 1 for row in kinds.values()), kinds
    assert set(kinds["bad_params"]["statuses"]) == {"400"}
    assert set(kinds["unknown_model"]["statuses"]) == {"404"}
    assert kinds["abort_mid_stream"]["statuses"].get("aborted", 0) >= 1
    # RSS was sampled for the gateway, both replicas and both engine cores.
    assert set(report["rss"]) == {"gateway", "replica0", "replica0-core", "replica1", "replica1-core"}
    assert all(row["peak_mib"] and row["peak_mib"] > 50 for row in report["rss"].values()), report["rss"]
