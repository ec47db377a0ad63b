"""TTL liveness and reaping, driven by the fake clock: no sleeps."""

from __future__ import annotations

import asyncio

import pytest

from registry.store import reap_periodically


def status(client, agent_id: str) -> str:
    return client.get(f"/agents/{agent_id}").json()["status"]


def discovered(client) -> list[str]:
    return [a["agent_id"] for a in client.post("/discover", json={}).json()["agents"]]


def test_an_agent_is_critical_once_its_ttl_passes(registry, agent, clock):
    registry.post("/register", json=agent)
    clock.advance(30)
    assert status(registry, agent["agent_id"]) == "passing"  # exactly at the TTL: still alive
    assert discovered(registry) == [agent["agent_id"]]
    clock.advance(0.01)
    assert status(registry, agent["agent_id"]) == "critical"
    assert discovered(registry) == []


def test_a_heartbeat_brings_a_critical_agent_back(registry, agent, clock):
    registry.post("/register", json=agent)
    clock.advance(45)
    assert discovered(registry) == []
    registry.post(f"/heartbeat/{agent['agent_id']}")
    assert status(registry, agent["agent_id"]) == "passing"
    assert discovered(registry) == [agent["agent_id"]]


def test_each_agent_has_its_own_ttl(registry, agent, clock):
    registry.post("/register", json=agent | {"agent_id": "short", "ttl_seconds": 5})
    registry.post("/register", json=agent | {"agent_id": "long", "ttl_seconds": 60})
    clock.advance(10)
    assert discovered(registry) == ["long"]


def test_reaping_removes_agents_only_after_the_grace(registry, agent, clock):
    store = registry.app.state.registry.store
    registry.post("/register", json=agent | {"agent_id": "stale"})
    registry.post("/register", json=agent | {"agent_id": "fresh"})
    clock.advance(30 + 299)
    registry.post("/heartbeat/fresh")
    assert store.reap() == []  # stale is critical, but still within the 300 s grace
    assert status(registry, "stale") == "critical"
    clock.advance(2)
    assert store.reap() == ["stale"]
    assert registry.get("/agents/stale").status_code == 404
    assert status(registry, "fresh") == "passing"
    assert registry.post("/heartbeat/stale").status_code == 404  # told to re-register
    assert registry.post("/register", json=agent | {"agent_id": "stale"}).status_code == 200


def test_the_reaper_runs_in_the_background(registry, agent, clock):
    store = registry.app.state.registry.store
    registry.post("/register", json=agent)
    reaped: list[int] = []

    class Stop(Exception):
        pass

    async def fake_sleep(seconds: float) -> None:
        if len(sleeps) == 3:
            raise Stop
        sleeps.append(seconds)
        clock.advance(200)

    sleeps: list[float] = []
    run = registry.app.state.registry.run
    with pytest.raises(Stop):
        asyncio.run(
            reap_periodically(store, 7.5, run=run, on_reaped=reaped.append, sleep=fake_sleep)
        )
    assert sleeps == [7.5, 7.5, 7.5]
    # 600 s after the last heartbeat: past TTL (30) + grace (300), removed on the 2nd round.
    assert reaped == [1]
    assert registry.get(f"/agents/{agent['agent_id']}").status_code == 404


def test_a_failing_reap_round_is_survived(registry, clock, caplog):
    store = registry.app.state.registry.store
    rounds = []

    def broken_reap():
        rounds.append(1)
        raise RuntimeError("database went away")

    class Stop(Exception):
        pass

    async def fake_sleep(seconds: float) -> None:
        if len(rounds) == 2:
            raise Stop

    store.reap = broken_reap
    with pytest.raises(Stop):
        asyncio.run(
            reap_periodically(store, 1, run=registry.app.state.registry.run, sleep=fake_sleep)
        )
    assert len(rounds) == 2
    assert "reaping expired agents failed" in caplog.text


def test_expired_agents_show_as_critical_in_metrics(registry, agent, clock):
    registry.post("/register", json=agent)
    clock.advance(1000)
    metrics = registry.get("/metrics").text
    assert 'registry_agents{status="critical"} 1.0' in metrics
