"""The fleet across hosts: three "hosts" on one machine as loopback addresses, one
PostgreSQL, two control hosts (a registry and a router each) and wrappers on two node
hosts, each daemon a real process bound to its host's address.

Control A is 127.0.0.2, control B 127.0.0.3; the nodes are 127.0.0.3 and 127.0.0.4 (a
host may be both). Every daemon gets the fleet's profile from the environment: the two
registries and the two routers (registry.urls, router.urls), one database, one token.
The model behind each wrapper is a fake Ollama on its node: what is tested is the
routing, the registrations and the records, not what a model says.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from sqlalchemy import create_engine, select

from router.usage import T as USAGE
from tests.conftest import Daemons, fake_ollama_at, free_port, port_map

TOKEN = "fleet-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CONTROLS = (CONTROL_A, CONTROL_B) = ("127.0.0.2", "127.0.0.3")
NODES = ("127.0.0.3", "127.0.0.4")
TTL = 3.0  # seconds: short, so that a gap in a wrapper's heartbeats would show
# Seconds each chat takes: long enough that a router killed under load has calls in flight.
LATENCY = 0.05
CHAT = {"model": "capability:reasoning", "messages": [{"role": "user", "content": "Hi"}]}

pytestmark = [pytest.mark.process, pytest.mark.postgres]


@dataclass
class Fleet:
    registries: list[str]  # A, B
    routers: list[str]  # A, B
    agents: list[str]  # the wrappers' agent ids, one per node
    hosts: dict[str, Daemons]  # "a", "b", and a node's by its address
    database_url: str


@pytest.fixture
def fleet(fresh_database, tmp_path) -> Iterator[Fleet]:
    ports = port_map("registry", "router")
    registries = [f"http://{host}:{ports['registry']}" for host in CONTROLS]
    routers = [f"http://{host}:{ports['router']}" for host in CONTROLS]
    profile = {
        "SWARM_DATABASE_URL": fresh_database,
        "SWARM_REGISTRY_TOKEN": TOKEN,
        "SWARM_REGISTRY__URLS": json.dumps(registries),
        "SWARM_REGISTRY__TTL_SECONDS": str(TTL),
        "SWARM_REGISTRY__ENDPOINT_ALLOWLIST": json.dumps(["127.0.0.0/8"]),
        "SWARM_ROUTER__URLS": json.dumps(routers),
        "SWARM_ROUTER__DISCOVERY_REFRESH_SECONDS": "0.2",
    }

    def host(name: str, **env: str) -> Daemons:
        directory = tmp_path / name
        directory.mkdir()
        return Daemons(directory, **profile, **env)

    hosts = {"a": host("a"), "b": host("b")}
    agents = [f"fleet_reasoner_{node.rsplit('.', 1)[1]}" for node in NODES]
    with contextlib.ExitStack() as stack:
        try:
            for name, address, registry in zip("ab", CONTROLS, registries, strict=True):
                argv = ("--host", address, "--port", str(ports["registry"]))
                hosts[name].start("registry", "registry", *argv, url=registry)
            for name, address, router in zip("ab", CONTROLS, routers, strict=True):
                argv = ("--host", address, "--port", str(ports["router"]))
                hosts[name].start("router", "router", *argv, url=router)
            for node, agent_id in zip(NODES, agents, strict=True):
                backend, port = (
                    stack.enter_context(fake_ollama_at(node, latency=LATENCY)),
                    free_port(),
                )
                hosts[node] = host(
                    node,
                    SWARM_BACKENDS__SMOLLM2__HOST=node,
                    SWARM_BACKENDS__SMOLLM2__PORT=str(backend),
                    SWARM_WRAPPERS__REASONER__HOST=node,
                    SWARM_WRAPPERS__REASONER__PORT=str(port),
                    SWARM_WRAPPERS__REASONER__AGENT_ID=agent_id,
                    SWARM_WRAPPERS__REASONER__HEARTBEAT_INTERVAL_SECONDS=str(TTL / 6),
                )
                hosts[node].start("reasoner", "services", "reasoner", url=f"http://{node}:{port}")
            yield Fleet(registries, routers, agents, hosts, fresh_database)
        finally:
            for daemons in hosts.values():
                daemons.kill_all()


def until(condition: Callable[[], object], within: float, why: Callable[[], object] = str) -> None:
    """Poll ``condition`` until it holds; fail with ``why()`` after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, why()
        time.sleep(0.05)


def status_on(registry: str, agent_id: str) -> str | None:
    response = httpx.get(f"{registry}/agents/{agent_id}", headers=AUTH, timeout=2)
    return response.json().get("status") if response.status_code == 200 else None


@dataclass
class Caller:
    """A client of the routers that tries the next one when one takes no connection or
    drops it (what the README tells users to set up), alternating the first it asks."""

    routers: list[str]
    answers: list[httpx.Response] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # attempts cut mid-call, by router
    failures: list[str] = field(default_factory=list)  # calls no router answered

    def call(self, first: int) -> None:
        order = self.routers[first:] + self.routers[:first]
        with httpx.Client(timeout=10, headers=AUTH) as http:
            for router in order:
                try:
                    self.answers.append(http.post(f"{router}/v1/chat/completions", json=CHAT))
                    return
                except httpx.ConnectError:
                    continue  # refused: nothing was sent, the next router
                except httpx.TransportError as error:
                    self.dropped.append(f"{router}: {error!r}")
        self.failures.append(f"every router failed ({order})")


def steady_load(caller: Caller, stop: threading.Event) -> None:
    turn = 0
    while not stop.is_set():
        caller.call(turn % len(caller.routers))
        turn += 1


def test_the_fleet_survives_a_registry_and_a_router_killed_under_load(fleet: Fleet, agent):
    registry_a, registry_b = fleet.registries

    # What registry A is told, registry B answers; the wrappers registered through A.
    assert httpx.post(f"{registry_a}/register", json=agent, headers=AUTH).status_code == 200
    asked = {"capabilities": ["planning"], "include_unhealthy": True}
    found = httpx.post(f"{registry_b}/discover", json=asked, headers=AUTH).json()["agents"]
    assert agent["agent_id"] in [record["agent_id"] for record in found]
    for agent_id in fleet.agents:
        until(lambda a=agent_id: status_on(registry_b, a) == "passing", 20)

    callers = [Caller(fleet.routers), Caller(fleet.routers)]
    stop = threading.Event()
    threads = [threading.Thread(target=steady_load, args=(c, stop)) for c in callers]
    for thread in threads:
        thread.start()

    def answered() -> int:
        return sum(len(caller.answers) for caller in callers)

    try:
        until(lambda: answered() >= 10, 15, lambda: fleet.hosts["a"].log("router"))

        # Registry A dies: the wrappers heartbeat through B, the routers read B.
        fleet.hosts["a"].running["registry"].kill()
        fleet.hosts["a"].running["registry"].wait(timeout=10)
        end = time.monotonic() + 2 * TTL
        while time.monotonic() < end:  # never expired: no gap in the heartbeats past the TTL
            for agent_id, node in zip(fleet.agents, NODES, strict=True):
                assert status_on(registry_b, agent_id) == "passing", fleet.hosts[node].log(
                    "reasoner"
                )
            time.sleep(0.1)
        before = answered()

        # Router A dies: what it had in flight may fail; a retry on B answers it.
        fleet.hosts["a"].running["router"].kill()
        fleet.hosts["a"].running["router"].wait(timeout=10)
        until(lambda: answered() >= before + 20, 15, lambda: fleet.hosts["b"].log("router"))
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)

    answers = [response for caller in callers for response in caller.answers]
    assert [caller.failures for caller in callers] == [[], []]
    assert len([d for caller in callers for d in caller.dropped]) <= len(callers)
    assert {response.status_code for response in answers} == {200}, answers[-1].text
    assert all(status_on(registry_b, agent_id) == "passing" for agent_id in fleet.agents)

    # Every acknowledged call has its call record (the wrapper's, reported to router A
    # until it died, then to B) in the shared store, and every call router B answered its
    # route record. Router A's route records are written in batches 0.1 s after its answers
    # (router/usage.py, UsageLog): a kill -9 loses those of its last 0.1 s, so not asserted.
    wanted = {
        "call": {response.headers["x-request-id"] for response in answers},
        "route": {
            response.headers["x-request-id"]
            for response in answers
            if response.url.host == CONTROL_B
        },
    }
    engine = create_engine(fleet.database_url)

    def missing() -> dict[str, set[str]]:
        with engine.connect() as conn:
            rows = conn.execute(
                select(USAGE.c.kind, USAGE.c.request_id).where(
                    USAGE.c.request_id.in_(wanted["call"])
                )
            ).all()
        stored = {(row.kind, row.request_id) for row in rows}
        gaps = {kind: {i for i in ids if (kind, i) not in stored} for kind, ids in wanted.items()}
        return {kind: ids for kind, ids in gaps.items() if ids}

    try:
        until(lambda: not missing(), 15, lambda: (missing(), fleet.hosts["b"].log("router")))
        with engine.connect() as conn:
            calls = select(USAGE.c.agent_id).where(USAGE.c.kind == "call").distinct()
            assert sorted(conn.execute(calls).scalars()) == sorted(fleet.agents)  # both nodes
    finally:
        engine.dispose()
