"""API keys, tenants and the admin key: who may call which route, and whose cache they share.

With no keys configured the gateway is open (any key, or none, is accepted) and every request
belongs to OPEN, whose client-sent cache_salt is passed on unchanged, as before. With keys,
each key names a tenant, and the cache_salt the gateway forwards to replicas (and hashes for
its own routing index) always starts with the tenant's salt, an HMAC of the tenant's name
under a per-gateway secret. A client's own cache_salt is appended to it, so it can split its
tenant's cache further but never reach another tenant's: the salts of two tenants differ in
their fixed-length prefix, so no client string makes them equal. Without that, one tenant
could learn from cached_tokens, or from time to first token, or from which replica it is
routed to, what another tenant's prompts start with.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from gateway.config import GatewayConfig
from gateway.errors import ApiError, error_json

# The ASGI scope key under which the front (gateway/app.py) leaves the request's Tenant.
TENANT_SCOPE_KEY = "prefixgate.tenant"
_SALT_HEX_CHARS = 32  # 128 bits of HMAC-SHA256: fixed length, so prefixes cannot overlap
# Routes anyone may call: probes and scrapes, which carry no tenant data.
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})
ADMIN_PREFIX = "/admin"
_SLASHES = re.compile("/{2,}")


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    salt: str | None  # None only for OPEN: the client's cache_salt is used as sent
    max_in_flight: int | None = None  # this tenant's own bound, under the gateway's

    def cache_salt(self, client_salt: str | None) -> str | None:
        """The salt forwarded to replicas: the tenant's, narrowed by the client's if it sent one."""
        if self.salt is None or client_salt is None:
            return client_salt if self.salt is None else self.salt
        return f"{self.salt}/{client_salt}"


OPEN = Tenant("", None)


class Refusal:
    """An answer given before any handler runs: status, OpenAI-style body and headers, encoded
    once. Returned, not raised: a shared exception instance re-raised would grow its traceback."""

    __slots__ = ("body", "error", "headers", "status")

    def __init__(self, error: ApiError) -> None:
        self.error = error
        self.status = error.status
        self.body = error_json(error)
        self.headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else error.headers


_MISSING_KEY = Refusal(
    ApiError(
        401,
        "You didn't provide an API key. Send it in the Authorization header as 'Bearer YOUR_KEY'.",
        code="invalid_api_key",
        error_type="invalid_request_error",
    )
)
_UNKNOWN_KEY = Refusal(
    ApiError(401, "Incorrect API key provided.", code="invalid_api_key", error_type="invalid_request_error")
)
_NOT_ADMIN = Refusal(
    ApiError(403, "this API key may not use admin routes", code="forbidden", error_type="permission_error")
)
_ADMIN_DISABLED = Refusal(
    ApiError(
        403,
        "admin routes are disabled: API keys are configured and no admin key is",
        code="forbidden",
        error_type="permission_error",
    )
)


def _bearer(authorization: str | None) -> str | None:
    if authorization is None:
        return None
    scheme, _, key = authorization.partition(" ")
    return key.strip() or None if scheme.lower() == "bearer" else None


def route_path(path: str) -> str:
    """The path as Litestar's router reads it: //admin/x/ is /admin/x, so must the checks be."""
    if "//" in path:
        path = _SLASHES.sub("/", path)
    if len(path) > 1 and path.endswith("/"):
        path = path[:-1]
    return path


class Access:
    """Checks a request's Authorization header against the configured keys; one dict lookup."""

    def __init__(self, tenants_by_key: Mapping[str, Tenant], admin_key: str | None) -> None:
        self.tenants_by_key = dict(tenants_by_key)
        # The header value as clients send it, so the common case is one lookup, no parsing.
        self._by_header = {f"Bearer {key}": tenant for key, tenant in self.tenants_by_key.items()}
        self.keys_required = bool(self.tenants_by_key)
        self._admin_key = admin_key.encode() if admin_key else None
        self.tenants = {t.name: t for t in self.tenants_by_key.values()}

    def check(self, path: str, authorization: str | None) -> Tenant | Refusal:
        """The request's tenant, or the Refusal (401 / 403) when it may not call `path` (as
        route_path gives it)."""
        if path.startswith(ADMIN_PREFIX):
            return self.check_admin(authorization)
        if not self.keys_required or path in OPEN_PATHS:
            return OPEN
        if authorization is None:
            return _MISSING_KEY
        tenant = self._by_header.get(authorization)
        if tenant is None:
            key = _bearer(authorization)
            tenant = self.tenants_by_key.get(key) if key is not None else None
            if tenant is None:
                return _MISSING_KEY if key is None else _UNKNOWN_KEY
        return tenant

    def check_admin(self, authorization: str | None) -> Tenant | Refusal:
        if self._admin_key is None:
            return _ADMIN_DISABLED if self.keys_required else OPEN
        key = _bearer(authorization)
        if key is None:
            return _MISSING_KEY
        if hmac.compare_digest(key.encode(), self._admin_key):  # no timing hint about the admin key
            return OPEN
        return _NOT_ADMIN if key in self.tenants_by_key else _UNKNOWN_KEY


def admin_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """On every admin route, behind the front's check: whatever path led the router there."""
    refused = connection.app.state.access.check_admin(connection.headers.get("authorization"))
    if isinstance(refused, Refusal):
        error = refused.error  # a fresh exception each time: a shared one would grow its traceback
        raise ApiError(error.status, error.message, code=error.code, error_type=error.error_type)


def tenant_salt(secret: bytes, tenant: str) -> str:
    return hmac.new(secret, tenant.encode(), hashlib.sha256).hexdigest()[:_SALT_HEX_CHARS]


def parse_key_list(text: str) -> tuple[tuple[str, str], ...]:
    """`key=tenant,key2=tenant2` (PREFIXGATE_API_KEYS) -> pairs."""
    pairs = []
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, tenant = item.strip().partition("=")
        if not sep or not key or not tenant:
            raise ValueError("PREFIXGATE_API_KEYS must be 'key=tenant,key2=tenant2,...'")
        pairs.append((key, tenant))
    return tuple(pairs)


def _read_keys_file(path: str) -> dict[str, Any]:
    """{"keys": {key: tenant}, "tenants": {tenant: {"max_in_flight": n}}, "salt_secret": str}."""
    file = Path(path)
    try:
        text = file.read_text()
        data = tomllib.loads(text) if file.suffix == ".toml" else json.loads(text)
    except (OSError, ValueError) as err:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise ValueError(f"cannot read the API keys file {path}: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys", {}), dict):
        raise ValueError(f"{path}: expected a table with 'keys' = {{key: tenant name}}")
    unknown = set(data) - {"keys", "tenants", "salt_secret"}
    if unknown:
        raise ValueError(f"{path}: unknown entries {sorted(unknown)} (known: keys, tenants, salt_secret)")
    return data


def load_access(config: GatewayConfig) -> Access:
    """The keys of config.api_keys_file and config.api_keys, resolved to Tenants; checked at start."""
    names: dict[str, str] = dict(config.api_keys)
    limits: dict[str, int] = {}
    secret = config.salt_secret
    if config.api_keys_file:
        data = _read_keys_file(config.api_keys_file)
        names.update(data.get("keys", {}))
        for tenant, settings in (data.get("tenants") or {}).items():
            if not isinstance(settings, dict) or set(settings) - {"max_in_flight"}:
                raise ValueError(f"tenant {tenant!r}: the only setting is max_in_flight")
            limit = settings.get("max_in_flight")
            if limit is not None:
                if not isinstance(limit, int) or limit < 1:
                    raise ValueError(f"tenant {tenant!r}: max_in_flight must be a positive integer")
                limits[tenant] = limit
        secret = secret or data.get("salt_secret")
    for key, tenant in names.items():
        if not isinstance(key, str) or not isinstance(tenant, str) or not key or not tenant or " " in key:
            raise ValueError("API keys and tenant names must be non-empty strings (keys without spaces)")
    if config.admin_key and config.admin_key in names:
        raise ValueError("the admin key must not also be a tenant's API key")
    # Without a configured secret, one derived from the keys themselves: as secret as they are,
    # and stable across restarts, so replicas' caches stay warm for each tenant.
    derived = hashlib.sha256("\n".join(sorted(names)).encode()).digest()
    secret_bytes = secret.encode() if secret else derived
    tenants = {
        name: Tenant(name, tenant_salt(secret_bytes, name), limits.get(name)) for name in set(names.values())
    }
    return Access({key: tenants[name] for key, name in names.items()}, config.admin_key)
