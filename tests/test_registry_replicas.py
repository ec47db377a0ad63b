"""Registry replicas on one database: reaping and liveness safe with several, the clock
of the database deciding TTLs, and wrappers and routers failing over between replicas."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from datetime import datetime

import httpx
import pytest
from sqlalchemy import create_engine, event, text

from registry.clock import DatabaseClock, registry_clock
from registry.store import AgentStore
from router.directory import Directory
from schemas.agents import AgentDefinition, DiscoverRequest, Heartbeat
from schemas.config import load_settings
from services.common.http import Failover
from services.wrapper.registration import Registrar
from tests.conftest import Daemons, FakeClock, failures_at_once, free_port

TTL, GRACE = 30.0, 300.0


@pytest.fixture
def two_stores(database_url):
    """Two replicas' stores on one database, each with its own clock (as two hosts)."""
    engines = [create_engine(database_url), create_engine(database_url)]
    stores = [
        AgentStore(engine, FakeClock(), default_ttl=TTL, reap_after=GRACE) for engine in engines
    ]
    stores[0].create_tables()
    yield stores
    for engine in engines:
        engine.dispose()


def found(store: AgentStore, capability: str) -> list[str]:
    request = DiscoverRequest(capabilities=[capability], include_unhealthy=True)
    return [record.agent_id for record in store.discover(request)]


def test_a_heartbeat_landing_inside_a_reap_keeps_the_agent(two_stores, agent):
    """The reaper of replica A decides at a time when the agent is past its grace; replica
    B's heartbeat commits after that decision, just before A's first DELETE runs (where the
    old select-then-delete-by-id had already chosen its victims). The agent must stay."""
    reaper, beater = two_stores
    beater.register(AgentDefinition.model_validate(agent))
    agent_id = agent["agent_id"]
    beater.clock.advance(TTL + GRACE + 5)  # B's heartbeat comes late, but before the reap
    reaper.clock.advance(TTL + GRACE + 10)

    landed: list[str] = []

    @event.listens_for(reaper.engine, "before_cursor_execute")
    def heartbeat_first(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("DELETE") and not landed:
            landed.append(statement)
            beater.heartbeat(agent_id, Heartbeat())

    assert reaper.reap() == []
    assert landed  # the heartbeat did land inside the reap
    assert beater.get(agent_id).status == "passing"
    assert found(beater, "planning") == [agent_id]  # its capabilities too


def test_two_reapers_at_once_remove_an_expired_agent_once(two_stores, agent):
    first, second = two_stores
    first.register(AgentDefinition.model_validate(agent | {"agent_id": "gone"}))
    for store in two_stores:
        store.clock.advance(TTL + GRACE + 1)
    first.register(AgentDefinition.model_validate(agent | {"agent_id": "live"}))
    results = [first.reap(), second.reap()]
    assert sorted(results) == [[], ["gone"]]
    assert [record.agent_id for record in first.list(limit=10)] == ["live"]
    assert found(second, "planning") == ["live"]  # the reaped one's capabilities went with it


def test_expiry_is_decided_by_the_registry_clock_not_the_agents(two_stores, agent):
    """Whichever replica answers reads the same expiry: a heartbeat through B keeps an
    agent registered through A alive, and nothing the agent sends moves its expiry."""
    a, b = two_stores
    record = a.register(AgentDefinition.model_validate(agent))
    a.clock.advance(TTL - 1)
    b.clock.advance(TTL - 1)
    ack = b.heartbeat(agent["agent_id"], Heartbeat())
    assert ack.expires_at.timestamp() == pytest.approx(
        record.registered_at.timestamp() + 2 * TTL - 1
    )
    a.clock.advance(TTL - 1)
    assert a.get(agent["agent_id"]).status == "passing"
    a.clock.advance(2)
    assert a.get(agent["agent_id"]).status == "critical"


def test_an_older_table_without_the_cascade_is_replaced(tmp_path, agent):
    engine = create_engine(f"sqlite:///{tmp_path / 'old.db'}")
    store = AgentStore(engine, FakeClock(), default_ttl=TTL, reap_after=GRACE)
    store.create_tables()
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE agent_capabilities"))
        conn.execute(
            text(
                "CREATE TABLE agent_capabilities (agent_id VARCHAR(128) NOT NULL "
                "REFERENCES agents (agent_id), capability VARCHAR(64) NOT NULL, "
                "expected_wait_ms FLOAT, PRIMARY KEY (agent_id, capability))"
            )
        )
    store.create_tables()
    store.register(AgentDefinition.model_validate(agent))
    store.clock.advance(TTL + GRACE + 1)
    assert store.reap() == [agent["agent_id"]]
    engine.dispose()


# --- the database's clock ------------------------------------------------------------------


@pytest.mark.postgres
def test_replicas_with_skewed_clocks_read_the_databases_time(postgres_server):
    """Two hosts an hour apart agree within the round trip: both read the database's."""
    engine = create_engine(postgres_server)
    try:
        assert isinstance(registry_clock(engine), DatabaseClock)
        with engine.connect() as conn:
            database_now = float(conn.execute(text("SELECT extract(epoch FROM now())")).scalar())
        ahead = DatabaseClock(engine, local=lambda: database_now + 3_600)
        behind = DatabaseClock(engine, local=lambda: database_now - 3_600)
        assert ahead() == pytest.approx(behind(), abs=1.0)
        assert ahead() == pytest.approx(database_now, abs=1.0)
    finally:
        engine.dispose()


def test_the_offset_is_measured_again_only_when_due_and_kept_on_failure():
    local, monotonic = FakeClock(1_000.0), FakeClock(0.0)
    readings = [1_100.0]

    class OneValueEngine:
        """An engine whose database's clock reads from ``readings`` (empty: unreachable)."""

        def connect(self):
            return self

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def execute(self, _statement):
            if not readings:
                raise ConnectionError("the database is away")
            value = readings.pop(0)
            return type("Result", (), {"scalar_one": staticmethod(lambda: value)})()

    clock = DatabaseClock(OneValueEngine(), local=local, monotonic=monotonic, resync=30)
    assert clock() == 1_100.0  # measured at the first reading
    local.advance(5)
    monotonic.advance(5)
    assert clock() == 1_105.0  # not due: the local clock plus the offset
    monotonic.advance(30)
    assert clock() == 1_105.0  # due, but the database is away: the last offset stays
    readings.append(1_205.0)
    monotonic.advance(30)
    assert clock() == 1_205.0


@pytest.mark.postgres
def test_replicas_starting_at_once_create_the_tables_once(postgres_server):
    engines = [create_engine(postgres_server) for _ in range(3)]
    stores = [AgentStore(e, FakeClock(), default_ttl=TTL, reap_after=GRACE) for e in engines]
    with engines[0].begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS agent_capabilities, agents"))
    failures = failures_at_once([store.create_tables for store in stores])
    try:
        assert failures == []
        assert stores[1].count() == 0
    finally:
        with engines[0].begin() as conn:
            conn.execute(text("DROP TABLE IF EXISTS agent_capabilities, agents"))
        for engine in engines:
            engine.dispose()


# --- failing over between replicas, in-process ------------------------------------------------


class Replica(httpx.AsyncBaseTransport):
    """One registry replica in front of the shared in-process registry: it can go down (a
    refused connection) or answer 503; it records the paths it was asked."""

    def __init__(self, app) -> None:
        self.inner = httpx.ASGITransport(app=app)
        self.state = "up"  # "up", "down" or "failing"
        self.asked: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.asked.append(f"{request.method} {request.url.path}")
        if self.state == "down":
            raise httpx.ConnectError("connection refused", request=request)
        if self.state == "failing":
            return httpx.Response(503, json={"error": {"message": "database unavailable"}})
        return await self.inner.handle_async_request(request)


@pytest.fixture
def replicas(wrapper_registry):
    """Replicas a, b and c of one registry, and a Failover over them in that order."""
    found = {name: Replica(wrapper_registry.app) for name in "abc"}
    clients = [
        httpx.AsyncClient(transport=replica, base_url=f"http://registry-{name}.test")
        for name, replica in found.items()
    ]
    return found, Failover(clients)


def registrar_on(http: Failover, definition: AgentDefinition, delays: list[float]) -> Registrar:
    async def sleep(delay: float) -> None:
        delays.append(delay)

    async def current() -> AgentDefinition:
        return definition

    async def check() -> Heartbeat:
        return Heartbeat()

    return Registrar(
        http, definition=current, check=check, interval=5, sleep=sleep, random=lambda: 1.0
    )


@pytest.mark.anyio
async def test_the_registrar_registers_with_the_next_replica_and_stays_there(replicas, agent):
    found, http = replicas
    found["a"].state = "down"
    delays: list[float] = []
    registrar = registrar_on(http, AgentDefinition.model_validate(agent), delays)
    await registrar.register()
    assert (found["a"].asked, found["b"].asked) == (["POST /register"], ["POST /register"])
    assert delays == []  # the next replica at once, not after a backoff
    await registrar.beat()
    beat = f"POST /heartbeat/{agent['agent_id']}"
    assert found["a"].asked == ["POST /register"]  # the replica that answered is asked first
    assert found["b"].asked == ["POST /register", beat]
    assert found["c"].asked == []


@pytest.mark.anyio
async def test_a_heartbeat_fails_over_on_a_5xx_and_keeps_the_registration(replicas, agent):
    found, http = replicas
    delays: list[float] = []
    registrar = registrar_on(http, AgentDefinition.model_validate(agent), delays)
    await registrar.register()
    found["a"].state = "failing"
    await registrar.beat()
    beat = f"POST /heartbeat/{agent['agent_id']}"
    assert found["a"].asked == ["POST /register", beat]
    assert found["b"].asked == [beat]  # it knows the agent: the database is shared
    assert registrar.registered is not None
    assert registrar.passing
    found["b"].state = "down"
    await registrar.beat()  # b, then c; a is not asked again before them
    assert found["c"].asked == [beat]
    assert found["a"].asked == ["POST /register", beat]


@pytest.mark.anyio
async def test_with_every_replica_down_registration_backs_off_then_goes_round(replicas, agent):
    found, http = replicas
    for replica in found.values():
        replica.state = "down"
    delays: list[float] = []
    registrar = registrar_on(http, AgentDefinition.model_validate(agent), delays)
    sleep = registrar.sleep

    async def recover_after_two(delay: float) -> None:
        await sleep(delay)
        if len(delays) == 2:
            found["c"].state = "up"

    registrar.sleep = recover_after_two
    await registrar.register()
    assert len(delays) == 2  # a backoff after each round in which none answered
    # Each round starts after the replica the last one started with: abc, bca, then c.
    assert [len(replica.asked) for replica in found.values()] == [2, 2, 3]
    assert http.base_url == httpx.URL("http://registry-c.test")


@pytest.mark.anyio
async def test_every_replica_answering_5xx_gives_the_last_answer(replicas):
    found, http = replicas
    for replica in found.values():
        replica.state = "failing"
    response = await http.get("/agents")
    assert response.status_code == 503
    assert [replica.asked for replica in found.values()] == [["GET /agents"]] * 3


@pytest.mark.anyio
async def test_the_directory_reads_whichever_replica_answers(replicas, wrapper_registry, agent):
    found, http = replicas
    assert wrapper_registry.post("/register", json=agent).status_code == 200
    found["a"].state = "down"

    async def never(_: float) -> None:
        raise AssertionError("no sleep expected")

    directory = Directory(http, interval=1, clock=FakeClock(), sleep=never)
    await directory.refresh()
    assert directory.error is None
    assert [record.agent_id for record in directory.agents] == [agent["agent_id"]]
    assert found["b"].asked == ["GET /agents"]
    for replica in found.values():
        replica.state = "down"
    await directory.refresh()  # none answers: the last snapshot stays, the error names all
    assert [record.agent_id for record in directory.agents] == [agent["agent_id"]]
    assert directory.error is not None
    assert all(f"registry-{name}.test" in directory.error for name in "abc")


# --- real processes: two registries on one PostgreSQL, a wrapper on both ------------------

PROCESS_TTL = 3.0  # seconds: short, so that a gap in the heartbeats would show


@pytest.fixture
def two_registries(fresh_database, tmp_path) -> Iterator[tuple[Daemons, list[str]]]:
    """Registries a and b as processes on one database; their URLs in that order."""
    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    daemons = Daemons(
        tmp_path,
        SWARM_DATABASE_URL=fresh_database,
        SWARM_REGISTRY__TTL_SECONDS=str(PROCESS_TTL),
        SWARM_REGISTRY__URLS=json.dumps(urls),
    )
    try:
        for name, port, url in zip("ab", ports, urls, strict=True):
            daemons.start(name, "registry", "--port", str(port), url=url)
        yield daemons, urls
    finally:
        daemons.kill_all()


@pytest.mark.process
@pytest.mark.postgres
def test_what_one_registry_is_told_the_other_answers(two_registries, agent):
    _, (a, b) = two_registries
    agent = agent | {"ttl_seconds": PROCESS_TTL}
    assert httpx.post(f"{a}/register", json=agent).status_code == 200
    found = httpx.post(f"{b}/discover", json={"capabilities": ["planning"]}).json()["agents"]
    assert [record["agent_id"] for record in found] == [agent["agent_id"]]
    # Heartbeats through b alone keep the agent registered through a alive past its TTL.
    end = time.monotonic() + 2 * PROCESS_TTL
    while time.monotonic() < end:
        beat = httpx.post(f"{b}/heartbeat/{agent['agent_id']}", json={"status": "passing"})
        assert beat.status_code == 200
        time.sleep(PROCESS_TTL / 6)
    record = httpx.get(f"{a}/agents/{agent['agent_id']}").json()
    assert record["status"] == "passing"


@pytest.mark.process
@pytest.mark.postgres
def test_a_wrapper_whose_registry_is_killed_stays_registered_through_the_other(
    two_registries, fake_ollama
):
    daemons, (_, b) = two_registries
    port = free_port()
    daemons.env |= {
        "SWARM_BACKENDS__SMOLLM2__PORT": str(fake_ollama),
        "SWARM_WRAPPERS__REASONER__PORT": str(port),
        "SWARM_WRAPPERS__REASONER__HEARTBEAT_INTERVAL_SECONDS": str(PROCESS_TTL / 6),
    }
    daemons.start("reasoner", "services", "reasoner", url=f"http://127.0.0.1:{port}")
    agent_id = load_settings(None).wrappers["reasoner"].agent_id

    def record() -> dict:
        return httpx.get(f"{b}/agents/{agent_id}", timeout=2).json()

    deadline = time.monotonic() + 20
    while record().get("status") != "passing":
        assert time.monotonic() < deadline, record()
        time.sleep(0.1)

    daemons.running["a"].kill()  # SIGKILL: no goodbye, its connections refused from now
    daemons.running["a"].wait(timeout=10)
    killed = time.time()
    beats: list[float] = []
    end = time.monotonic() + 3 * PROCESS_TTL
    while time.monotonic() < end:
        seen = record()
        assert seen["status"] == "passing", seen  # never expired: no gap past the TTL
        beats.append(datetime.fromisoformat(seen["last_heartbeat"]).timestamp())
        time.sleep(0.1)
    seen_beats = sorted(set(beats))  # from the last one through a, as sampled
    assert len([beat for beat in seen_beats if beat > killed]) >= 3, daemons.log("reasoner")
    assert max(later - earlier for earlier, later in itertools.pairwise(seen_beats)) < PROCESS_TTL
    assert "trying http://127.0.0.1" in daemons.log("reasoner")


@pytest.mark.process
@pytest.mark.postgres
def test_a_router_whose_registry_is_killed_reads_the_other(two_registries, agent):
    daemons, (_, b) = two_registries
    port = free_port()
    daemons.env |= {
        "SWARM_ROUTER__PORT": str(port),
        "SWARM_ROUTER__DISCOVERY_REFRESH_SECONDS": "0.2",
    }
    router = f"http://127.0.0.1:{port}"
    daemons.start("router", "router", url=router)
    daemons.running["a"].kill()
    daemons.running["a"].wait(timeout=10)
    # Registered after a died, so the router can only learn of it from b.
    assert httpx.post(f"{b}/register", json=agent).status_code == 200
    wanted = "capability:planning"
    deadline = time.monotonic() + 10
    while wanted not in [m["id"] for m in httpx.get(f"{router}/v1/models").json()["data"]]:
        assert time.monotonic() < deadline, daemons.log("router")
        time.sleep(0.1)
    assert httpx.get(f"{router}/health").json()["status"] == "healthy"
