"""API keys and tenants on a real gateway in front of one real replica, on 127.0.0.1.

Two tenants send the same long prompt: each gets hits on its own repeats and none from the
other, whatever cache_salt a client sends. Keys are checked on the API and admin routes, and
no error body carries a traceback or an internal address.
"""

from __future__ import annotations

import json
import random
from typing import Any

import httpx
import openai
import pytest

from gateway import admin_routes
from gateway.auth import (
    OPEN,
    Refusal,
    Tenant,
    admin_guard,
    load_access,
    parse_key_list,
    route_path,
    tenant_salt,
)
from gateway.config import GatewayConfig

pytestmark = pytest.mark.slow

KEY_A, KEY_B, ADMIN_KEY = "sk-tenant-a-0123", "sk-tenant-b-4567", "admin-89ab"
SALT_SECRET = "test-salt-secret"
KEYS_TOML = f"""
salt_secret = "{SALT_SECRET}"
[keys]
"{KEY_A}" = "team-a"
"{KEY_B}" = "team-b"
"""
_WORDS = [
    "ledger",
    "invoice",
    "tenant",
    "region",
    "quota",
    "audit",
    "policy",
    "report",
    "vendor",
    "budget",
    "account",
    "review",
]


def long_prompt(seed: int) -> str:
    """~120 tokens: several full KV blocks, so a shared prefix would show as cached tokens."""
    rng = random.Random(seed)
    return f"Document {seed}: " + " ".join(rng.choice(_WORDS) for _ in range(100))


@pytest.fixture(scope="module")
def gateway(procs, engine_cmd, gateway_cmd, tmp_path_factory: pytest.TempPathFactory):
    replica = procs(*engine_cmd)
    keys = tmp_path_factory.mktemp("keys") / "keys.toml"
    keys.write_text(KEYS_TOML)
    replica.wait_ready()
    extra = ["--api-keys", str(keys)]
    return procs(gateway_cmd([replica], extra=extra), {"PREFIXGATE_ADMIN_KEY": ADMIN_KEY}).wait_ready(60)


def client(gateway: Any, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)


def cached_tokens(gateway: Any, key: str, prompt: str, cache_salt: str | None = None) -> int:
    extra = {"cache_salt": cache_salt} if cache_salt is not None else None
    # A plain completion: no chat template, whose shared opening would hit within a tenant.
    completion = client(gateway, key).completions.create(
        model="default", prompt=prompt, max_tokens=1, extra_body=extra
    )
    assert completion.usage is not None and completion.usage.prompt_tokens > 64
    details = completion.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens is not None
    return details.cached_tokens


def test_a_tenant_hits_its_own_prefix_and_never_another_tenants(gateway: Any) -> None:
    prompt = long_prompt(1)
    assert cached_tokens(gateway, KEY_A, prompt) == 0
    assert cached_tokens(gateway, KEY_A, prompt) > 0  # the same key: a hit
    assert cached_tokens(gateway, KEY_B, prompt) == 0  # the other tenant: none
    assert cached_tokens(gateway, KEY_B, prompt) > 0  # and its own repeat hits again


def test_answers_to_tenants_do_not_name_the_replica(gateway: Any) -> None:
    chat = {"model": "default", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {KEY_A}"}
    for stream in (False, True):
        with httpx.stream(
            "POST", gateway.url + "/v1/chat/completions", json={**chat, "stream": stream}, headers=headers
        ) as response:
            body = response.read().decode()
            assert response.status_code == 200, body
            assert "x-prefixgate-replica" not in response.headers
            assert "127.0.0.1" not in str(response.headers) and "127.0.0.1" not in body


def test_a_client_cache_salt_narrows_sharing_and_cannot_reach_another_tenant(gateway: Any) -> None:
    prompt_b = long_prompt(2)
    assert cached_tokens(gateway, KEY_B, prompt_b) == 0
    assert cached_tokens(gateway, KEY_B, prompt_b) > 0  # cached for B, under B's salt
    # Whatever salt tenant A sends, even B's own derived salt, A misses B's cache.
    salt_b = tenant_salt(SALT_SECRET.encode(), "team-b")
    for salt in ("team-b", salt_b, ""):
        assert cached_tokens(gateway, KEY_A, prompt_b, cache_salt=salt) == 0, salt
    # Within A, a client salt splits A's cache further: its own repeats hit, plain A misses.
    prompt_a = long_prompt(3)
    assert cached_tokens(gateway, KEY_A, prompt_a, cache_salt="project-1") == 0
    assert cached_tokens(gateway, KEY_A, prompt_a, cache_salt="project-1") > 0
    assert cached_tokens(gateway, KEY_A, prompt_a) == 0
    assert cached_tokens(gateway, KEY_A, prompt_a, cache_salt="project-2") == 0


def _assert_clean(body: str) -> None:
    assert "Traceback" not in body and "127.0.0.1" not in body and "localhost" not in body, body


def test_api_routes_need_a_known_key(gateway: Any) -> None:
    chat = {"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    bodies = []
    for headers in ({}, {"Authorization": "Bearer sk-unknown"}, {"Authorization": "Basic abc"}):
        for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models")):
            response = httpx.request(method, gateway.url + path, json=chat, headers=headers, timeout=30)
            assert response.status_code == 401, (headers, path, response.text)
            error = response.json()["error"]
            assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
            bodies.append(response.text)
    with pytest.raises(openai.AuthenticationError) as raised:
        client(gateway, "sk-unknown").chat.completions.create(
            model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=1
        )
    assert raised.value.status_code == 401 and raised.value.code == "invalid_api_key"
    assert [m.id for m in client(gateway, KEY_A).models.list()]
    assert client(gateway, KEY_B).completions.create(model="default", prompt="Hello", max_tokens=2).choices
    # Errors a tenant can cause past the key check are as clean as the 401s.
    headers = {"Authorization": f"Bearer {KEY_A}"}
    for path, body in (
        ("/v1/chat/completions", b"{not json"),
        ("/v1/chat/completions", b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}'),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": 100000}'),
    ):
        response = httpx.post(gateway.url + path, content=body, headers=headers, timeout=30)
        assert 400 <= response.status_code < 500, response.text
        bodies.append(response.text)
    for body in bodies:
        _assert_clean(body)


def test_admin_routes_need_the_admin_key(gateway: Any) -> None:
    url = gateway.url + "/admin/replicas"
    add = {"url": "http://127.0.0.1:9/"}
    for key, status in ((None, 401), ("sk-unknown", 401), (KEY_A, 403)):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        # //admin and a trailing slash reach the same routes, and meet the same checks.
        for path in ("/admin/replicas", "//admin//replicas/"):
            for response in (
                httpx.get(gateway.url + path, headers=headers),
                httpx.post(gateway.url + path, json=add, headers=headers),
                httpx.delete(gateway.url + path, params={"url": "http://127.0.0.1:9"}, headers=headers),
            ):
                assert response.status_code == status, (key, path, response.text)
                _assert_clean(response.text)
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    listed = httpx.get(url, headers=admin)
    assert listed.status_code == 200 and len(listed.json()["replicas"]) == 1  # nothing was added
    assert httpx.get(gateway.url + "/health").status_code == 200  # probes need no key
    assert b"prefixgate_gateway_refused_requests" in httpx.get(gateway.url + "/metrics").content
    # The admin key is for admin routes only.
    response = httpx.get(gateway.url + "/v1/models", headers=admin)
    assert response.status_code == 401


def test_keys_files_and_salts(tmp_path: Any) -> None:
    toml = tmp_path / "keys.toml"
    toml.write_text(KEYS_TOML + "\n[tenants.team-b]\nmax_in_flight = 3\n")
    as_json = tmp_path / "keys.json"
    as_json.write_text(json.dumps({"salt_secret": SALT_SECRET, "keys": {KEY_A: "team-a", KEY_B: "team-b"}}))
    from_toml = load_access(GatewayConfig(api_keys_file=str(toml), admin_key=ADMIN_KEY))
    from_json = load_access(GatewayConfig(api_keys_file=str(as_json)))
    from_env = load_access(GatewayConfig(api_keys=parse_key_list(f"{KEY_A}=team-a, {KEY_B}=team-b")))
    a = from_toml.check("/v1/completions", f"Bearer {KEY_A}")
    b = from_toml.check("/v1/completions", f"bearer  {KEY_B} ")
    assert isinstance(a, Tenant) and isinstance(b, Tenant)
    assert (a.name, b.name, b.max_in_flight) == ("team-a", "team-b", 3)
    assert from_json.check("/v1/completions", f"Bearer {KEY_A}") == Tenant("team-a", a.salt)
    assert from_env.tenants["team-a"].salt not in (None, a.salt)  # another secret, another salt
    assert a.salt is not None and b.salt is not None and len(a.salt) == len(b.salt) != 0
    # A client salt narrows within the tenant and never equals another tenant's salt.
    assert a.cache_salt(None) == a.salt and a.cache_salt("x") == f"{a.salt}/x"
    assert all(a.cache_salt(s) not in (b.salt, b.cache_salt(s)) for s in (b.salt, "", "x", b.cache_salt("x")))
    assert OPEN.cache_salt("x") == "x" and OPEN.cache_salt(None) is None
    assert isinstance(from_toml.check("/v1/completions", None), Refusal)
    assert from_toml.check("/health", None) is OPEN
    assert from_json.check("/admin/replicas", f"Bearer {ADMIN_KEY}").status == 403  # type: ignore[union-attr]
    bad = tmp_path / "bad.toml"
    for text in ('[keys]\n"k" = 3\n', "keys = [", '[tenants.x]\nmax_in_flight = 0\n[keys]\n"k" = "x"\n'):
        bad.write_text(text)
        with pytest.raises(ValueError):
            load_access(GatewayConfig(api_keys_file=str(bad)))
    with pytest.raises(ValueError):
        parse_key_list("no-tenant-here")


def test_every_admin_route_is_guarded() -> None:
    admin = [r for r in admin_routes.ROUTES if any(p.startswith("/admin") for p in r.paths)]
    assert admin and all(admin_guard in (r.guards or ()) for r in admin)
    assert route_path("//admin///replicas/") == "/admin/replicas" and route_path("/") == "/"
