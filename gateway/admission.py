"""A bound on the completion requests in flight at the gateway, overall and per tenant.

A request is counted from admission (before its body is read or tokenized) until the ASGI
call that serves it returns: its whole answer sent, its stream ended, or its client gone.
The front (gateway/app.py) pairs enter() and leave() in one try/finally, so each admitted
request is released exactly once whatever happens to it. Beyond the bound the answer is an
immediate 429 with Retry-After: cheap for the gateway, and clear to clients (the OpenAI
SDK waits Retry-After and retries).
"""

from __future__ import annotations

from gateway.auth import Refusal, Tenant
from gateway.errors import ApiError


class Admission:
    __slots__ = ("_overloaded", "_tenant_full", "_tenant_in_flight", "in_flight", "limit")

    def __init__(self, limit: int, retry_after_s: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self._tenant_in_flight: dict[str, int] = {}
        retry = {"Retry-After": str(retry_after_s)}
        self._overloaded = Refusal(
            ApiError(
                429,
                f"the gateway is at its limit of {limit} requests in flight; retry after {retry_after_s} s",
                code="rate_limit_exceeded",
                headers=retry,
            )
        )
        self._tenant_full = Refusal(
            ApiError(
                429,
                f"this API key's tenant is at its limit of requests in flight; retry after {retry_after_s} s",
                code="rate_limit_exceeded",
                headers=retry,
            )
        )

    def enter(self, tenant: Tenant) -> Refusal | None:
        """Count the request in (None), or return the 429 to answer, counting nothing."""
        if self.in_flight >= self.limit:
            return self._overloaded
        if tenant.max_in_flight is not None:
            count = self._tenant_in_flight.get(tenant.name, 0)
            if count >= tenant.max_in_flight:
                return self._tenant_full
            self._tenant_in_flight[tenant.name] = count + 1
        self.in_flight += 1
        return None

    def leave(self, tenant: Tenant) -> None:
        self.in_flight -= 1
        if tenant.max_in_flight is not None:
            self._tenant_in_flight[tenant.name] -= 1

    def tenant_in_flight(self, name: str) -> int:
        return self._tenant_in_flight.get(name, 0)
