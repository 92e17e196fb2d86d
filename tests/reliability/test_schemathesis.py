"""bench/fuzz_api.py in small: schemathesis sends each replica and gateway operation a few
dozen generated cases (valid and invalid by the schema). Any 5xx, broken or hung answer,
undocumented answer, dead process or leaked KV block fails the test; the full run (1,000
cases per operation) is the bench script's."""

from __future__ import annotations

import pytest

from bench.fuzz_api import (
    SCHEMA_PATH,
    OperationResult,
    Server,
    final_checks,
    fuzz_server,
    restore_gateway,
)

pytestmark = pytest.mark.slow

CASES = 20


def _problems(results: list[OperationResult]) -> list[str]:
    out = []
    for r in results:
        if r.server_errors or r.timeouts or r.check_failures:
            out.append(
                f"{r.operation}: {r.server_errors} 5xx, {r.timeouts} broken/hung, "
                f"{dict(r.check_failures)}\n" + "\n".join(r.examples)
            )
    return out


def test_schemathesis_replica_then_gateway(fuzz_servers: tuple[Server, Server]) -> None:
    replica, gateway = fuzz_servers
    vocab_size = replica.get_json("/internal/info")["vocab_size"]
    replica_results = fuzz_server(replica, CASES, vocab_size)
    gateway_results = fuzz_server(gateway, CASES, vocab_size, last=("/admin/replicas",))
    assert replica.alive(), replica.log_tail()
    assert gateway.alive(), gateway.log_tail()
    restore_gateway(gateway, replica)
    results = replica_results + gateway_results
    assert not _problems(results), "\n\n".join(_problems(results))
    # Every operation (but GET /kv/events) got its cases.
    fuzzed = {r.operation for r in results}
    assert {"POST /v1/chat/completions", "POST /v1/completions", "POST /internal/generate"} <= fuzzed
    assert all(r.cases >= CASES for r in results), [(r.operation, r.cases) for r in results]
    after = final_checks(replica, gateway)
    assert after["ok"], after


def test_replica_schema_describes_the_request_bodies(fuzz_servers: tuple[Server, Server]) -> None:
    replica, _ = fuzz_servers
    schema = replica.get_json(SCHEMA_PATH)
    bodies = {
        path: methods["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        for path, methods in schema["paths"].items()
        if "post" in methods
    }
    assert bodies == {
        "/v1/chat/completions": "#/components/schemas/ChatCompletionRequest",
        "/v1/completions": "#/components/schemas/CompletionRequest",
        "/internal/generate": "#/components/schemas/GenerateRequest",
    }
    chat = schema["components"]["schemas"]["ChatCompletionRequest"]
    assert chat["required"] == ["messages"]
    assert {"type": "integer", "minimum": 1, "maximum": 128} in chat["properties"]["n"]["anyOf"]
    error = schema["paths"]["/v1/completions"]["post"]["responses"]["4XX"]["content"]["application/json"]
    assert error["schema"]["$ref"] == "#/components/schemas/ErrorResponse"
