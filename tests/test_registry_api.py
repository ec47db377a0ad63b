"""The registry's HTTP contract: register, heartbeat, deregister, list, get, discover."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from registry.app import create_app
from registry.settings import RegistrySettings


def register(client, agent: dict, **changes) -> httpx.Response:
    return client.post("/register", json=agent | changes)


def ids(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [a["agent_id"] for a in response.json()["agents"]]


def test_register_returns_the_stored_record(registry, agent, clock):
    response = register(registry, agent)
    assert response.status_code == 200
    record = response.json()
    for key in agent:
        assert record[key] == agent[key]
    assert record["status"] == "passing"
    assert record["ttl_seconds"] == 30.0
    assert record["registered_at"] == record["last_heartbeat"]
    assert record["expires_at"].startswith("2027-01-15T08:00:30")  # clock start + TTL
    assert registry.get(f"/agents/{agent['agent_id']}").json() == record


def test_register_is_an_idempotent_upsert(registry, agent, clock):
    first = register(registry, agent).json()
    clock.advance(5)
    again = register(registry, agent, capabilities=["reasoning"], name="renamed").json()
    assert again["registered_at"] == first["registered_at"]
    assert again["last_heartbeat"] > first["last_heartbeat"]
    assert (again["name"], again["capabilities"]) == ("renamed", ["reasoning"])
    assert ids(registry.get("/agents")) == [agent["agent_id"]]
    # The capability index follows the upsert: the dropped capabilities are gone.
    assert ids(registry.post("/discover", json={"capabilities": ["planning"]})) == []
    assert ids(registry.post("/discover", json={"capabilities": ["reasoning"]})) == [
        agent["agent_id"]
    ]


def test_capabilities_are_normalized(registry, agent):
    record = register(registry, agent, capabilities=[" Reasoning", "PLANNING ", "reasoning"]).json()
    assert record["capabilities"] == ["reasoning", "planning"]
    found = registry.post("/discover", json={"capabilities": [" REASONING "]})
    assert ids(found) == [agent["agent_id"]]


def test_optional_ttl_is_honoured(registry, agent):
    assert register(registry, agent, ttl_seconds=5).json()["ttl_seconds"] == 5


# The agents table as the registry created it before tier became the spec's integer.
OLDER_AGENTS_TABLE = """
CREATE TABLE agents (
    agent_id VARCHAR(128) PRIMARY KEY, name VARCHAR(128) NOT NULL, tier VARCHAR(64) NOT NULL,
    role VARCHAR(64) NOT NULL, endpoint VARCHAR(2048) NOT NULL, transport VARCHAR(64) NOT NULL,
    cost_per_1k_tokens FLOAT NOT NULL, capabilities JSON NOT NULL, metadata JSON NOT NULL,
    ttl_seconds FLOAT NOT NULL, check_status VARCHAR(16) NOT NULL, output VARCHAR(1024) NOT NULL,
    in_flight INTEGER, latency_ms FLOAT, registered_at FLOAT NOT NULL,
    last_heartbeat FLOAT NOT NULL, expires_at FLOAT NOT NULL
);
INSERT INTO agents VALUES ('old', 'old', 'local', 'reasoner', 'http://127.0.0.1:9', 'http', 0,
    '["reasoning"]', '{}', 30, 'passing', '', NULL, NULL, 0, 0, 0);
"""


def test_a_database_from_an_older_version_is_replaced(make_registry, tmp_path, agent):
    """Registrations are soft state: the agents register again on their next heartbeat."""
    path = tmp_path / "older.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(OLDER_AGENTS_TABLE)
    settings = RegistrySettings(database_url=f"sqlite:///{path}", reap_interval_seconds=86_400)
    client = make_registry(settings)
    assert register(client, agent).status_code == 200
    assert ids(client.get("/agents")) == [agent["agent_id"]]
    assert client.post("/heartbeat/old").status_code == 404  # so it registers again


def test_tier_and_locality_default_to_a_local_model_service(registry, agent):
    bare = {k: v for k, v in agent.items() if k not in ("tier", "locality", "transport")}
    record = register(registry, bare).json()
    assert (record["tier"], record["locality"], record["transport"]) == (2, "local", "http")


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"tier": "local"}, "tier: tier is an integer level (e.g. 2); 'local' goes in locality"),
        ({"tier": 10}, "tier: Input should be less than or equal to 9"),
        ({"tier": 1.5}, "tier: Input should be a valid integer"),
        ({"locality": "remote"}, "locality: Input should be 'local' or 'cloud'"),
    ],
)
def test_a_bad_tier_or_locality_is_a_422_naming_it(registry, agent, changes, says):
    response = register(registry, agent, **changes)
    assert response.status_code == 422
    assert says in response.json()["error"]["message"]


def test_metadata_nested_too_deep_is_a_422_and_nothing_is_stored(registry, agent):
    # Issue 13: 300 levels (1.4 KB) were stored, then every read of the agents answered 500.
    deep: dict = {}
    for _ in range(300):
        deep = {"a": deep}
    response = register(registry, agent, metadata=deep)
    assert response.status_code == 422
    assert "nested more than 16 levels" in response.json()["error"]["message"]
    assert registry.get("/agents").json()["agents"] == []
    assert register(registry, agent, metadata={"a": {"b": [1, {"c": 2}]}}).status_code == 200


def test_heartbeat_refreshes_liveness_and_carries_live_stats(registry, agent, clock):
    register(registry, agent)
    clock.advance(20)
    response = registry.post(
        f"/heartbeat/{agent['agent_id']}", json={"in_flight": 3, "latency_ms": 41.5}
    )
    assert response.status_code == 200
    assert response.json()["status"] == "passing"
    assert response.json()["expires_at"].startswith("2027-01-15T08:00:50")
    record = registry.get(f"/agents/{agent['agent_id']}").json()
    assert (record["in_flight"], record["latency_ms"]) == (3, 41.5)


def test_heartbeat_without_body(registry, agent):
    register(registry, agent)
    assert registry.post(f"/heartbeat/{agent['agent_id']}").status_code == 200


def test_heartbeat_of_an_unknown_agent_is_404_so_it_re_registers(registry):
    response = registry.post("/heartbeat/ghost")
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "agent_not_found"
    assert error["request_id"] == response.headers["x-request-id"]


def test_an_agent_can_report_itself_critical(registry, agent):
    register(registry, agent)
    beat = {"status": "critical", "output": "backend unreachable"}
    registry.post(f"/heartbeat/{agent['agent_id']}", json=beat)
    record = registry.get(f"/agents/{agent['agent_id']}").json()
    assert (record["status"], record["output"]) == ("critical", "backend unreachable")
    assert ids(registry.post("/discover", json={"capabilities": ["reasoning"]})) == []


def test_deregister(registry, agent):
    register(registry, agent)
    assert registry.delete(f"/agents/{agent['agent_id']}").status_code == 204
    assert registry.get(f"/agents/{agent['agent_id']}").status_code == 404
    assert registry.delete(f"/agents/{agent['agent_id']}").status_code == 404
    assert ids(registry.post("/discover", json={})) == []


def test_unknown_agent_is_404_in_the_envelope(registry):
    response = registry.get("/agents/nobody")
    assert response.status_code == 404
    assert set(response.json()["error"]) >= {"message", "type", "code", "request_id"}


@pytest.fixture
def fleet(registry, agent):
    """Four agents with overlapping capabilities, roles, tiers and localities."""
    specs = {
        "reasoner": ("reasoner", 2, "local", ["reasoning", "planning"]),
        "classifier": ("classifier", 2, "local", ["classification", "tagging"]),
        "tlc": ("domain_classifier", 3, "local", ["classification", "domain_classification"]),
        "remote": ("reasoner", 2, "cloud", ["reasoning", "classification"]),
    }
    for port, (agent_id, spec) in enumerate(specs.items(), start=9001):
        role, tier, locality, capabilities = spec
        endpoint = f"http://127.0.0.1:{port}"
        assert (
            register(
                registry,
                agent,
                agent_id=agent_id,
                role=role,
                tier=tier,
                locality=locality,
                capabilities=capabilities,
                endpoint=endpoint,
            ).status_code
            == 200
        )
    return registry


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"capabilities": ["classification"]}, ["classifier", "remote", "tlc"]),
        ({"capabilities": ["reasoning", "classification"]}, ["remote"]),
        ({"capabilities": ["reasoning", "classification"], "match": "all"}, ["remote"]),
        ({"capabilities": ["planning", "tagging"], "match": "any"}, ["classifier", "reasoner"]),
        ({"capabilities": ["classification"], "role": "domain_classifier"}, ["tlc"]),
        ({"capabilities": ["reasoning"], "locality": "local"}, ["reasoner"]),
        ({"capabilities": ["classification"], "tier": 3}, ["tlc"]),
        ({"capabilities": ["classification"], "tier": 2, "locality": "cloud"}, ["remote"]),
        ({"capabilities": ["nothing_has_this"]}, []),
        ({}, ["classifier", "reasoner", "remote", "tlc"]),
    ],
)
def test_discover(fleet, query, expected):
    assert ids(fleet.post("/discover", json=query)) == expected


@pytest.mark.parametrize(
    ("query", "matching"),
    [
        ({"capabilities": ["classification"]}, {"classifier", "remote", "tlc"}),
        (
            {"capabilities": ["classification", "planning"], "match": "any"},
            {"classifier", "reasoner", "remote", "tlc"},
        ),
    ],
)
def test_discover_is_bounded_by_limit(fleet, query, matching):
    """Past the limit, which matches come back is the database's choice; the page is sorted."""
    found = ids(fleet.post("/discover", json=query | {"limit": 2}))
    assert len(found) == 2
    assert set(found) <= matching
    assert found == sorted(found)


def test_discover_returns_healthy_agents_unless_asked(fleet, clock):
    clock.advance(20)
    fleet.post("/heartbeat/tlc")
    clock.advance(15)  # everyone else is now past the 30 s TTL
    query = {"capabilities": ["classification"]}
    assert ids(fleet.post("/discover", json=query)) == ["tlc"]
    everyone = fleet.post("/discover", json=query | {"include_unhealthy": True}).json()["agents"]
    statuses = {a["agent_id"]: a["status"] for a in everyone}
    assert statuses == {"classifier": "critical", "remote": "critical", "tlc": "passing"}


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"capability": "classification"}, ["classifier", "remote", "tlc"]),
        ({"capability": " Classification "}, ["classifier", "remote", "tlc"]),
        ({"role": "reasoner"}, ["reasoner", "remote"]),
        ({"locality": "cloud"}, ["remote"]),
        ({"tier": 3}, ["tlc"]),
        ({"tier": 2, "locality": "local"}, ["classifier", "reasoner"]),
        ({"role": "reasoner", "capability": "planning"}, ["reasoner"]),
        ({"limit": 1, "offset": 1}, ["reasoner"]),
    ],
)
def test_list_filters(fleet, params, expected):
    assert ids(fleet.get("/agents", params=params)) == expected


def test_list_filters_by_status(fleet, clock):
    fleet.post("/heartbeat/classifier", json={"status": "warning", "output": "slow"})
    fleet.post("/heartbeat/tlc", json={"status": "critical"})
    assert ids(fleet.get("/agents", params={"status": "warning"})) == ["classifier"]
    assert ids(fleet.get("/agents", params={"status": "critical"})) == ["tlc"]
    assert ids(fleet.get("/agents", params={"status": "passing"})) == ["reasoner", "remote"]
    clock.advance(31)
    assert ids(fleet.get("/agents", params={"status": "passing"})) == []
    assert len(ids(fleet.get("/agents", params={"status": "critical"}))) == 4


@pytest.mark.parametrize(
    ("method", "path", "payload"),
    [
        ("get", "/agents?limit=5000", None),
        ("post", "/discover", {"limit": 5000}),
        ("get", "/agents?limit=0", None),
        ("get", "/agents?status=sleepy", None),
        ("get", "/agents?tier=local", None),
        ("get", "/agents?tier=10", None),
        ("get", "/agents?locality=remote", None),
        ("post", "/discover", {"tier": -1}),
        ("post", "/discover", {"match": "most"}),
        ("post", "/discover", {"capabilities": "reasoning"}),
        ("post", "/discover", {"capabilities": ["x"], "colour": "blue"}),
    ],
)
def test_bad_list_and_discover_queries_are_422(fleet, method, path, payload):
    kwargs = {"json": payload} if payload is not None else {}
    response = getattr(fleet, method)(path, **kwargs)
    assert response.status_code == 422
    assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "payload",
    [{"include_unhealthy": 0}, {"include_unhealthy": "true"}, {"tier": "2"}, {"limit": 5.0}],
)
def test_discover_takes_each_value_only_as_the_json_type_of_its_schema(fleet, payload):
    # Issue 13: include_unhealthy 0 was read as false, silently.
    response = fleet.post("/discover", json=payload)
    assert response.status_code == 422
    assert response.json()["error"]["param"] == next(iter(payload))


def test_lists_are_bounded_by_the_page_size(make_registry, registry_settings, agent):
    client = make_registry(registry_settings, max_page_size=2)
    for n in range(3):
        register(client, agent, agent_id=f"a{n}")
    assert len(ids(client.get("/agents", params={"limit": 2}))) == 2
    assert client.get("/agents", params={"limit": 3}).status_code == 422
    assert "at most 2" in client.post("/discover", json={"limit": 3}).json()["error"]["message"]


def test_concurrent_upserts_of_the_same_agent(registry_settings, agent, clock):
    """Many first registrations of one agent at once: one row, the last write wins cleanly."""
    app = create_app(registry_settings, clock=clock)

    async def race() -> list[httpx.Response]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://r") as client:
                calls = [
                    client.post("/register", json=agent | {"name": f"writer {n}"})
                    for n in range(16)
                ]
                responses = await asyncio.gather(*calls)
                listed = await client.get("/agents")
                found = await client.post("/discover", json={"capabilities": ["reasoning"]})
                return [*responses, listed, found]

    *responses, listed, found = asyncio.run(race())
    assert [r.status_code for r in responses] == [200] * 16
    agents = listed.json()["agents"]
    assert len(agents) == 1
    assert agents[0]["name"] in {f"writer {n}" for n in range(16)}
    assert len(found.json()["agents"]) == 1
    assert agents[0]["capabilities"] == agent["capabilities"]


def test_concurrent_store_upserts_from_threads(registry, agent):
    store = registry.app.state.registry.store
    from schemas.agents import AgentDefinition

    definitions = [AgentDefinition(**agent | {"name": f"t{n}"}) for n in range(24)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        records = list(pool.map(store.register, definitions))
    assert {r.agent_id for r in records} == {agent["agent_id"]}
    assert len(ids(registry.get("/agents"))) == 1


def test_health_and_metrics(registry, agent):
    register(registry, agent)
    registry.post(f"/heartbeat/{agent['agent_id']}")
    registry.post("/heartbeat/ghost")
    health = registry.get("/health")
    assert health.status_code == 200
    body = health.json()
    assert (body["status"], body["service"], body["database"], body["agents"]) == (
        "healthy",
        "registry",
        "ok",
        1,
    )
    metrics = registry.get("/metrics").text
    assert 'registry_agents{status="passing"} 1.0' in metrics
    assert "registry_registrations_total 1.0" in metrics
    assert 'registry_heartbeats_total{result="unknown_agent"} 1.0' in metrics
    assert (
        'http_requests_total{method="POST",route="/heartbeat/{agent_id}",status="404"} 1.0'
        in metrics
    )


def test_health_is_503_when_the_database_fails(registry):
    registry.app.state.registry.store.engine.dispose()
    registry.app.state.registry.store.engine = __import__("sqlalchemy").create_engine(
        "sqlite:////nonexistent/dir/registry.db"
    )
    response = registry.get("/health")
    assert response.status_code == 503
    assert response.json()["status"] == "unhealthy"
    assert response.json()["database"] == "error"


def test_alive_always_and_ready_while_the_database_answers(registry):
    assert registry.get("/readyz").json() == {"status": "ready"}
    registry.app.state.registry.store.engine.dispose()
    registry.app.state.registry.store.engine = __import__("sqlalchemy").create_engine(
        "sqlite:////nonexistent/dir/registry.db"
    )
    assert registry.get("/healthz").json() == {"status": "alive"}
    not_ready = registry.get("/readyz")
    assert (not_ready.status_code, not_ready.json()["status"]) == (503, "not_ready")
    assert not_ready.json()["reason"].startswith("database unavailable")


def test_openapi_documents_the_contract(registry):
    schema = registry.get("/openapi.json").json()
    assert {
        "/register",
        "/heartbeat/{agent_id}",
        "/agents",
        "/agents/{agent_id}",
        "/discover",
        "/health",
    } <= schema["paths"].keys()
    assert "AgentDefinition" in schema["components"]["schemas"]
    assert registry.get("/docs").status_code == 200


def test_request_id_is_echoed_or_made(registry):
    assert (
        registry.get("/health", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"]
        == "abc-123"
    )
    made = registry.get("/health").headers["x-request-id"]
    assert len(made) == 32
    # A header that could forge log lines is replaced, not echoed.
    assert (
        registry.get("/health", headers={"X-Request-ID": "a b\tc"}).headers["x-request-id"]
        != "a b\tc"
    )
