"""The registry as a real process: durability across kill -9, flags, shutdown."""

from __future__ import annotations

import signal
import subprocess
import sys

import httpx
import pytest

from tests.conftest import REPO, free_port, process_env

pytestmark = pytest.mark.process


def test_an_acknowledged_registration_survives_kill_9(start_registry_process, agent):
    port = free_port()
    process, url = start_registry_process(port)
    registered = httpx.post(f"{url}/register", json=agent, timeout=5)
    assert registered.status_code == 200
    heartbeat = {"status": "warning", "output": "warming up", "load": {"in_flight": 2}}
    assert httpx.post(f"{url}/heartbeat/{agent['agent_id']}", json=heartbeat).status_code == 200

    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=10) == -signal.SIGKILL

    _, url = start_registry_process(port)
    record = httpx.get(f"{url}/agents/{agent['agent_id']}", timeout=5).json()
    assert record["endpoint"] == agent["endpoint"]
    assert record["capabilities"] == agent["capabilities"]
    assert record["registered_at"] == registered.json()["registered_at"]
    assert (record["status"], record["output"]) == ("warning", "warming up")
    assert record["load"]["in_flight"] == 2
    found = httpx.post(f"{url}/discover", json={"capabilities": ["planning"]}).json()
    assert [a["agent_id"] for a in found["agents"]] == [agent["agent_id"]]


def test_host_and_port_flags_and_graceful_stop(start_registry_process):
    port = free_port()
    process, url = start_registry_process(port)
    health = httpx.get(f"{url}/health").json()
    assert (health["service"], health["port"]) == ("registry", port)
    process.send_signal(signal.SIGTERM)
    # uvicorn re-raises the signal after a graceful shutdown, as a well-behaved child.
    assert process.wait(timeout=15) in (0, -signal.SIGTERM)
    output = process.stdout.read().decode()
    assert "Application shutdown complete" in output
    assert "Traceback" not in output


def test_the_token_from_the_environment_guards_writes(start_registry_process, agent):
    _, url = start_registry_process(free_port(), SWARM_REGISTRY_TOKEN="t0ken")
    assert httpx.post(f"{url}/register", json=agent).status_code == 401
    authorized = {"Authorization": "Bearer t0ken"}
    assert httpx.post(f"{url}/register", json=agent, headers=authorized).status_code == 200


def test_a_port_in_use_is_one_clear_line(start_registry_process, tmp_path):
    port = free_port()
    start_registry_process(port)
    result = subprocess.run(
        [sys.executable, "-m", "registry", "--port", str(port)],
        cwd=REPO,
        env=process_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "address already in use" in result.stderr
    assert "Traceback" not in result.stderr
