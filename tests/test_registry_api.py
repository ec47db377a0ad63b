"""The registry's HTTP contract: register, heartbeat, deregister, list, get, discover."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import create_engine

from registry.app import create_app
from registry.settings import RegistrySettings
from registry.tables import AgentRow


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


OLDER_CAPABILITIES_TABLE = """
CREATE TABLE agent_capabilities (
    agent_id VARCHAR(128) NOT NULL REFERENCES agents (agent_id),
    capability VARCHAR(64) NOT NULL, PRIMARY KEY (agent_id, capability)
);
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


def test_a_capabilities_table_from_an_older_version_is_replaced(make_registry, tmp_path, agent):
    """Before discovery sorted by wait from the capability index, the table had no wait."""
    path = tmp_path / "older.db"
    engine = create_engine(f"sqlite:///{path}")
    AgentRow.__table__.create(engine)
    engine.dispose()
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(OLDER_CAPABILITIES_TABLE)
    settings = RegistrySettings(database_url=f"sqlite:///{path}", reap_interval_seconds=86_400)
    client = make_registry(settings)
    assert register(client, agent).status_code == 200
    beat(client, agent["agent_id"], load={"expected_wait_ms": 5.0})
    query = {"capabilities": agent["capabilities"][:1], "sort": "expected_wait"}
    assert ids(client.post("/discover", json=query)) == [agent["agent_id"]]


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


LOAD = {
    "in_flight": 3,
    "queued": 2,
    "parallel": 1,
    "service_ms_per_call": 400.0,
    "service_ms_per_token": 12.5,
    "expected_wait_ms": 1200.0,
}
UNKNOWN_LOAD = dict.fromkeys(LOAD)


def beat(client, agent_id: str, **body) -> None:
    response = client.post(f"/heartbeat/{agent_id}", json=body)
    assert response.status_code == 200, response.text


def load_of(client, agent_id: str) -> tuple[dict | None, str | None]:
    record = client.get(f"/agents/{agent_id}").json()
    return record["load"], record["load_reported_at"]


def test_heartbeat_refreshes_liveness(registry, agent, clock):
    register(registry, agent)
    clock.advance(20)
    response = registry.post(f"/heartbeat/{agent['agent_id']}", json={"load": LOAD})
    assert response.status_code == 200
    assert response.json()["status"] == "passing"
    assert response.json()["expires_at"].startswith("2027-01-15T08:00:50")


def test_an_agent_reporting_no_load_has_an_unknown_load_not_zero(registry, agent, clock):
    """The spec's clients heartbeat with no body: their load is null. A heartbeat states the
    load as of now, so one without any replaces an earlier report; so does a registration."""
    agent_id = agent["agent_id"]
    assert register(registry, agent).json()["load"] is None
    beat(registry, agent_id, load=LOAD)
    clock.advance(1)
    beat(registry, agent_id, status="passing")
    assert load_of(registry, agent_id) == (None, None)
    beat(registry, agent_id, load=LOAD)
    assert register(registry, agent).json()["load"] is None


def test_an_older_wrappers_heartbeat_stats_are_its_load(registry, agent):
    """Before issue 14 a wrapper sent in_flight and latency_ms beside the status."""
    agent_id = agent["agent_id"]
    register(registry, agent)
    beat(registry, agent_id, in_flight=3, latency_ms=41.5)
    load = UNKNOWN_LOAD | {"in_flight": 3, "service_ms_per_call": 41.5}
    assert load_of(registry, agent_id)[0] == load
    beat(registry, agent_id, in_flight=9, load=LOAD)  # the load's own form wins
    assert load_of(registry, agent_id)[0] == LOAD


@pytest.mark.parametrize(
    ("load", "says"),
    [
        ({"queued": 2, "in_flight": 1}, "queued counts calls of in_flight"),
        ({"parallel": 0}, "load.parallel: Input should be greater than or equal to 1"),
        ({"in_flight": -1}, "load.in_flight: Input should be greater than or equal to 0"),
        ({"expected_wait_ms": 1e12}, "load.expected_wait_ms: Input should be less than"),
        ({"in_flight": "3"}, "load.in_flight: Input should be a valid integer"),
        ({"waiting": 3}, "load.waiting: Extra inputs are not permitted"),
    ],
)
def test_a_bad_load_is_a_422_and_changes_nothing(registry, agent, load, says):
    agent_id = agent["agent_id"]
    register(registry, agent)
    beat(registry, agent_id, load=LOAD)
    response = registry.post(f"/heartbeat/{agent_id}", json={"load": load})
    assert response.status_code == 422
    assert says in response.json()["error"]["message"]
    assert load_of(registry, agent_id)[0] == LOAD


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


def test_heartbeat_load_round_trips_through_the_registry(fleet, clock):
    """What a heartbeat reports comes back whole from /agents, /agents/{id} and /discover,
    with the registry's time of the report."""
    clock.advance(5)
    beat(fleet, "tlc", load=LOAD)
    partial = {"in_flight": 0, "parallel": 4, "expected_wait_ms": 0.0}
    beat(fleet, "classifier", load=partial)
    clock.advance(1)
    one = fleet.get("/agents/tlc").json()
    assert one["load"] == LOAD
    assert one["load_reported_at"].startswith("2027-01-15T08:00:05")
    assert one["last_heartbeat"] == one["load_reported_at"]
    listed = {a["agent_id"]: a for a in fleet.get("/agents").json()["agents"]}
    found = fleet.post("/discover", json={"capabilities": ["classification"]}).json()["agents"]
    for answer in (listed, {a["agent_id"]: a for a in found}):
        assert answer["tlc"]["load"] == LOAD
        # Fields an agent leaves out are unknown, not zero.
        assert answer["classifier"]["load"] == UNKNOWN_LOAD | partial
        assert (answer["remote"]["load"], answer["remote"]["load_reported_at"]) == (None, None)


def test_a_stale_load_comes_back_as_unknown(fleet, clock):
    """A report older than the agent's TTL (30 s here) is answered as null, never as zero,
    wherever the agent still appears; when it was reported stays readable."""
    beat(fleet, "tlc", load=LOAD)
    clock.advance(30)
    assert load_of(fleet, "tlc")[0] == LOAD  # as old as the TTL: still answered
    clock.advance(0.5)
    load, reported_at = load_of(fleet, "tlc")
    assert (load, reported_at[:19]) == (None, "2027-01-15T08:00:00")
    listed = {a["agent_id"]: a["load"] for a in fleet.get("/agents").json()["agents"]}
    assert listed["tlc"] is None
    query = {"capabilities": ["domain_classification"], "include_unhealthy": True}
    assert [a["load"] for a in fleet.post("/discover", json=query).json()["agents"]] == [None]


def test_discover_sorts_by_expected_wait_unknown_last(fleet, clock):
    """Lowest reported wait first, then the agents whose wait is unknown (none reported,
    stale, or reported without a wait), by agent id; the sort comes before the limit."""
    beat(fleet, "tlc", load={"expected_wait_ms": 1.0})
    clock.advance(20)
    beat(fleet, "classifier", load={"expected_wait_ms": 500.0})
    beat(fleet, "remote", load={"expected_wait_ms": 20.0})
    beat(fleet, "reasoner", load={"in_flight": 1})
    clock.advance(15)  # the tlc's report is 35 s old: stale, and the agent expired

    def found(**query) -> list[str]:
        return ids(fleet.post("/discover", json=query | {"sort": "expected_wait"}))

    classification = ["classification"]
    assert found(capabilities=classification) == ["remote", "classifier"]
    assert found(capabilities=classification, include_unhealthy=True) == [
        "remote",
        "classifier",
        "tlc",
    ]
    assert found(capabilities=classification, limit=1) == ["remote"]
    assert found(capabilities=["planning", "tagging"], match="any", limit=1) == ["classifier"]
    assert found(capabilities=["reasoning", "classification"]) == ["remote"]
    assert found() == ["remote", "classifier", "reasoner"]
    assert found(limit=2) == ["remote", "classifier"]
    # Unsorted, discovery answers by agent id.
    unsorted = {"capabilities": ["reasoning"]}
    assert ids(fleet.post("/discover", json=unsorted)) == ["reasoner", "remote"]


def test_discover_by_wait_follows_each_heartbeat_and_orders_the_unknown_by_id(fleet, clock):
    """The wait discovery sorts by is the last heartbeat's; the agents of unknown wait come
    after, by agent id, however they came to be unknown (no load now, or a stale one)."""
    beat(fleet, "remote", load={"expected_wait_ms": 20.0})
    beat(fleet, "tlc", load={"expected_wait_ms": 5.0})
    clock.advance(20)
    beat(fleet, "classifier", load={"expected_wait_ms": 1.0})
    beat(fleet, "reasoner", load={"expected_wait_ms": 2.0})
    both = {"capabilities": ["classification", "reasoning"], "match": "any"}

    def found(**query) -> list[str]:
        return ids(fleet.post("/discover", json=both | query | {"sort": "expected_wait"}))

    # remote has both capabilities: it comes back once.
    assert found() == ["classifier", "reasoner", "tlc", "remote"]
    assert found(limit=3) == ["classifier", "reasoner", "tlc"]
    beat(fleet, "classifier", load={"expected_wait_ms": 30.0})
    assert found() == ["reasoner", "tlc", "remote", "classifier"]
    beat(fleet, "reasoner")  # no load: unknown from now on
    beat(fleet, "tlc", load={"in_flight": 2})  # a load without a wait
    assert found() == ["remote", "classifier", "reasoner", "tlc"]
    clock.advance(15)  # remote's report is 35 s old: stale, and remote expired
    assert found() == ["classifier", "reasoner", "tlc"]
    assert found(include_unhealthy=True) == ["classifier", "reasoner", "remote", "tlc"]
    assert found(include_unhealthy=True, limit=3) == ["classifier", "reasoner", "remote"]
    assert found(capabilities=["classification"], include_unhealthy=True, limit=2) == [
        "classifier",
        "remote",
    ]


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
        ("post", "/discover", {"sort": "cost"}),
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
