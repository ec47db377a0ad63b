"""The profile: loaded and validated in one place, overridable by SWARM_* env vars."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from router.settings import RouterSettings
from schemas.config import ConfigError, RouterConfig, WrapperConfig, load_settings
from services.common.server import exposure_problem, is_loopback
from services.modelhost.settings import ModelHostSettings
from services.wrapper.settings import WrapperSettings
from tests.conftest import BACKEND, DATA, REPO, process_env, read, sent_json

PROFILES = sorted((REPO / "config").glob("swarm*.yaml"))


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in [n for n in __import__("os").environ if n.startswith("SWARM_")]:
        monkeypatch.delenv(name)


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_shipped_profiles_are_valid(profile):
    settings = load_settings(profile)
    assert {"reasoner", "classifier", "tlc_domain_classifier"} <= settings.wrappers.keys()
    assert settings.wrappers["tlc_domain_classifier"].port == 8052
    assert settings.wrappers["tlc_domain_classifier"].backend == "classifier"


def test_default_profile_matches_the_design():
    settings = load_settings()
    assert settings.host == "127.0.0.1"
    assert (settings.registry.port, settings.router.port) == (6121, 6103)
    ports = {name: w.port for name, w in settings.wrappers.items()}
    assert ports == {
        "reasoner": 8050,
        "classifier": 8051,
        "tlc_domain_classifier": 8052,
        "embedder": 8053,
    }
    assert {b.kind for b in settings.backends.values()} == {"embedded"}
    assert settings.registry_url == "http://127.0.0.1:6121"
    assert settings.registry_token is None


def test_default_profile_has_a_dedicated_embedder():
    settings = load_settings()
    backend = settings.backends["minilm"]
    assert (backend.kind, backend.model, backend.port) == ("embedded", "all-minilm:22m", 11436)
    wrapper = settings.wrappers["embedder"]
    assert (wrapper.backend, wrapper.model) == ("minilm", "all-minilm:22m")
    assert (wrapper.agent_id, wrapper.role, wrapper.capabilities) == (
        "emb_all_minilm_22m",
        "embedder",
        ["embedding"],
    )
    ports = [b.port for b in settings.backends.values()]
    assert len(set(ports)) == len(ports)


def test_ollama_profile_matches_the_design():
    settings = load_settings(REPO / "config" / "swarm.ollama.yaml")
    agents = {
        w.agent_id: (w.model, settings.backends[w.backend].port)
        for w in settings.wrappers.values()
        if w.backend in settings.backends
    }
    assert agents == {
        "llm_llama31_8b": ("llama3.1:8b", 11434),
        "llm_tinyllama_1b": ("tinyllama:1.1b", 11435),
    }


def test_swarm_config_picks_the_profile(monkeypatch, tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text("registry: {port: 7001}\n")
    monkeypatch.setenv("SWARM_CONFIG", str(profile))
    assert load_settings().registry.port == 7001


def test_env_overrides_single_values(monkeypatch, tmp_path):
    monkeypatch.setenv("SWARM_REGISTRY__PORT", "7121")
    monkeypatch.setenv("SWARM_WRAPPERS__REASONER__PORT", "9050")
    monkeypatch.setenv("SWARM_DATABASE_URL", "postgresql+psycopg://db.example/swarm")
    monkeypatch.setenv("SWARM_REGISTRY_TOKEN", "s3cret")
    monkeypatch.setenv("SWARM_DATA_DIR", str(tmp_path))
    settings = load_settings()
    assert settings.registry.port == 7121
    assert settings.wrappers["reasoner"].port == 9050
    # The rest of the entry still comes from the profile.
    assert settings.wrappers["reasoner"].model == "smollm2:135m"
    assert settings.sqlite_url("registry") == "postgresql+psycopg://db.example/swarm"
    assert settings.registry_token.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)


def test_default_database_is_sqlite_under_the_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SWARM_DATA_DIR", str(tmp_path))
    assert load_settings().sqlite_url("registry") == f"sqlite:///{tmp_path}/registry.db"


@pytest.mark.parametrize(
    ("env", "yaml", "expected"),
    [
        (
            {"SWARM_REGISTRY__PORT": "99999"},
            "",
            "registry.port: Input should be less than or equal to 65535 (got '99999')",
        ),
        ({"SWARM_REGISTRY__PORT": "abc"}, "", "registry.port: Input should be a valid integer"),
        (
            {},
            "registry: {ttl_seconds: -1}\n",
            "registry.ttl_seconds: Input should be greater than 0",
        ),
        ({}, "registry: {prot: 1}\n", "registry.prot: Extra inputs are not permitted"),
        ({}, "registry: {endpoint_allowlist: ['10.0.0.0/33']}\n", "registry.endpoint_allowlist.0"),
        (
            {"SWARM_LOG_LEVEL": "loud"},
            "",
            "log_level: Input should be 'debug', 'info', 'warning' or 'error'",
        ),
        ({}, "router: {port: 6121}\n", "router.port: port 6121 is already used by registry.port"),
        (
            {},
            "wrappers: {x: {agent_id: x, name: x, port: 9000, model: m, backend: nowhere,"
            " capabilities: [a], role: r}}\n",
            "wrappers.x.backend: 'nowhere' names no backend or wrapper",
        ),
        ({}, "registry: [1, 2\n", "not valid YAML"),
        ({}, "- a list\n", "the top level must be a mapping"),
    ],
)
def test_bad_values_name_the_key(monkeypatch, tmp_path, env, yaml, expected):
    assert expected in refusal(monkeypatch, tmp_path, env, yaml)


def refusal(monkeypatch, tmp_path, env: dict[str, str], yaml: str) -> str:
    """The one line that refuses the profile ``yaml`` under the environment ``env``."""
    profile = tmp_path / "p.yaml"
    profile.write_text(yaml)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings(profile)
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- backends: one Ollama server, many models; one model per embedded host ----------------

ONE_OLLAMA = DATA / "swarm.one_ollama.yaml"


def test_one_ollama_server_serves_a_model_per_wrapper():
    settings = load_settings(ONE_OLLAMA)
    wrappers = {name: WrapperSettings.from_swarm(settings, name) for name in settings.wrappers}
    assert {w.backend_url for w in wrappers.values()} == {"http://127.0.0.1:11434"}
    assert {name: w.model for name, w in wrappers.items()} == {
        "reasoner": "llama3.1:8b",
        "classifier": "tinyllama:1.1b",
    }


@pytest.mark.anyio
async def test_each_wrapper_asks_the_one_server_for_its_own_model(
    monkeypatch, start_wrapper, backend
):
    host, port = BACKEND.removeprefix("http://").split(":")
    monkeypatch.setenv("SWARM_BACKENDS__OLLAMA__HOST", host)
    monkeypatch.setenv("SWARM_BACKENDS__OLLAMA__PORT", port)
    settings = load_settings(ONE_OLLAMA)
    route = backend.post("/api/chat").respond(json=read("chat_response.json"))
    asked = []
    for name, wrapper in settings.wrappers.items():
        served = WrapperSettings.from_swarm(settings, name).model_copy(update={"usage_url": None})
        running = await start_wrapper(served)
        chat = {"model": "any", "messages": [{"role": "user", "content": "Hi"}]}
        assert (await running.http.post("/v1/chat/completions", json=chat)).status_code == 200
        asked.append((str(route.calls.last.request.url), sent_json(route)["model"]))
        assert asked[-1][1] == wrapper.model
    assert {url for url, _ in asked} == {f"{BACKEND}/api/chat"}


@pytest.mark.parametrize(
    ("backends", "wrapper_model", "expected"),
    [
        (
            "{a: {kind: embedded, port: 9100}}",
            "m",
            "backends.a: an embedded backend needs a model: the one it loads",
        ),
        (
            "{a: {kind: ollama, port: 9100, model: m}}",
            "m",
            "backends.a: an Ollama backend takes no model: each wrapper names the model it "
            "serves on it",
        ),
        (
            "{a: {kind: ollama, port: 9100}, b: {kind: ollama, port: 9100}}",
            "m",
            "backends.b.port: port 9100 is already used by backends.a.port: describe the server "
            "once and name each model in its wrappers",
        ),
        (
            "{a: {kind: embedded, port: 9100, model: smollm2:135m}}",
            "gemma3:270m",
            "wrappers.x.model: 'gemma3:270m' is not the model of the embedded backend 'a' "
            "('smollm2:135m')",
        ),
    ],
)
def test_a_backend_that_cannot_serve_its_wrappers_is_refused_in_one_line(
    monkeypatch, tmp_path, backends, wrapper_model, expected
):
    profile = (
        f"backends: {backends}\n"
        f"wrappers: {{x: {{agent_id: x, name: x, port: 9000, model: '{wrapper_model}', "
        "backend: a, capabilities: [c], role: r}}\n"
    )
    assert (
        refusal(monkeypatch, tmp_path, {}, profile) == f"config {tmp_path / 'p.yaml'}: {expected}"
    )


def test_missing_profile_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read"):
        load_settings(tmp_path / "nope.yaml")


# --- empty and zero values: refused naming the key, or documented as what they do -------------


@pytest.mark.parametrize(
    ("env", "yaml", "expected"),
    [
        (
            {"SWARM_REGISTRY_TOKEN": ""},
            "",
            "registry_token: SWARM_REGISTRY_TOKEN is set but empty: unset it to run without a "
            "token, or give the token writes must carry",
        ),
        ({"SWARM_REGISTRY_TOKEN": "  "}, "", "SWARM_REGISTRY_TOKEN is set but empty"),
        (
            {"SWARM_DATABASE_URL": ""},
            "",
            "database_url: SWARM_DATABASE_URL is set but empty: unset it for SQLite files under "
            "data_dir",
        ),
        ({"SWARM_DATABASE_URL": "db.example"}, "", "database_url: is not a database URL"),
        ({"SWARM_HOST": ""}, "", "host: is empty; leave it out for the default host"),
        ({"SWARM_DATA_DIR": ""}, "", "data_dir: is empty; leave it out for the user's data"),
        ({}, "registry: {url: ''}\n", "registry.url: is empty; leave it out for http://host:port"),
        ({}, "registry: {url: 'ftp://x'}\n", "registry.url: endpoint must be an http:// or"),
        (
            {"SWARM_REGISTRY__HOST": " "},
            "",
            "registry.host: is empty; leave it out for the profile's host",
        ),
        (
            {},
            "registry: {endpoint_allowlist: []}\n",
            "registry.endpoint_allowlist: is empty: no agent could register",
        ),
        (
            {"SWARM_REGISTRY__ENDPOINT_ALLOWLIST": "localhost"},
            "",
            "SWARM_* values for lists and mappings are JSON",
        ),
    ],
)
def test_an_empty_value_is_refused_naming_its_key(monkeypatch, tmp_path, env, yaml, expected):
    assert expected in refusal(monkeypatch, tmp_path, env, yaml)


def test_an_empty_swarm_config_is_refused_not_the_default_profile(monkeypatch):
    monkeypatch.setenv("SWARM_CONFIG", "")
    with pytest.raises(ConfigError, match=r"^SWARM_CONFIG is set but empty: unset it for "):
        load_settings()


def test_a_token_is_read_without_surrounding_whitespace(monkeypatch):
    """A header carries none, so a token with some could never match."""
    monkeypatch.setenv("SWARM_REGISTRY_TOKEN", " s3cret\n")
    assert load_settings().registry_token.get_secret_value() == "s3cret"


def test_an_empty_provider_key_counts_as_unset(monkeypatch):
    settings = RouterSettings.from_swarm(load_settings(REPO / "config" / "swarm.ollama.yaml"))
    monkeypatch.setenv("OPENAI_API_KEY", "")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    assert list(settings.keyed_providers) == ["anthropic"]


@pytest.mark.parametrize(
    ("key", "says"),
    [
        ("rate_limit_per_second", "; 0 turns it off."),
        ("retry_wait_max_seconds", "; 0: never retry."),
        ("reference_price_per_1k_tokens", "; 0: none."),
    ],
)
def test_a_zero_that_switches_something_off_is_allowed_and_says_so(key, says):
    assert RouterConfig.model_fields[key].description.endswith(says)
    assert getattr(RouterConfig(**{key: 0}), key) == 0


def test_token_value_never_appears_in_errors(monkeypatch, tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text("registry_token: 8675309\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(profile)
    assert "registry_token: Input should be a valid string" in str(caught.value)
    assert "8675309" not in str(caught.value)


@pytest.mark.process
@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"SWARM_REGISTRY__TTL_SECONDS": "soon"}, "registry.ttl_seconds: Input should be a valid"),
        ({"SWARM_REGISTRY_TOKEN": ""}, "registry_token: SWARM_REGISTRY_TOKEN is set but empty"),
    ],
)
def test_a_daemon_with_a_bad_value_stops_with_one_line(tmp_path, env, expected):
    result = subprocess.run(
        [sys.executable, "-m", "registry"],
        cwd=REPO,
        env=process_env(tmp_path, **env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert Path(lines[0].split("config ", 1)[1].split(":", 1)[0]).name == "swarm.yaml"


# --- across hosts: no open daemon off loopback, no any-address endpoint, router replicas ------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST.", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.0.2.2", False),
        ("gpu1.swarm.internal", False),
    ],
)
def test_loopback_addresses(host, loopback):
    assert is_loopback(host) is loopback


def test_off_loopback_a_daemon_needs_the_registry_token(tmp_path):
    open_profile = load_settings(write(tmp_path, "host: 127.0.0.1\n"))
    assert exposure_problem("127.0.0.2", open_profile) is None
    problem = exposure_problem("10.0.0.5", open_profile)
    assert problem is not None
    assert "10.0.0.5" in problem
    assert "SWARM_REGISTRY_TOKEN" in problem
    secured = load_settings(write(tmp_path, "registry_token: fleet-secret\n"))
    assert exposure_problem("0.0.0.0", secured) is None


@pytest.mark.process
@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "registry", "--host", "0.0.0.0"],
        # An address this machine does not have: the refusal comes before any bind (exit 3).
        ["-m", "registry", "--host", "198.51.100.7"],
        ["-m", "router", "--host", "0.0.0.0"],
        ["-m", "services", "reasoner", "--host", "0.0.0.0"],
    ],
    ids=["registry-any", "registry-unbound", "router", "wrapper"],
)
def test_a_daemon_off_loopback_without_a_token_stops_with_one_line(tmp_path, argv):
    result = subprocess.run(
        [sys.executable, *argv],
        cwd=REPO,
        env=process_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"refusing to listen on {argv[-1]}")
    assert "registry token" in lines[0]


def test_a_wrapper_on_the_any_address_must_advertise_one(tmp_path):
    wrapper = (
        "wrappers:\n  reasoner:\n    {agent_id: r, name: R, host: 0.0.0.0, port: 9000, "
        "model: m, backend: ollama, capabilities: [reasoning], role: reasoner%s}\n"
        "  chained:\n    {agent_id: c, name: C, host: 10.0.0.6, port: 9010, model: m, "
        "backend: reasoner, capabilities: [classification], role: classifier}\n"
        "backends:\n  ollama: {kind: ollama, port: 11434}\n"
    )
    with pytest.raises(ConfigError, match=r"wrappers\.reasoner\.advertise: it binds 0\.0\.0\.0"):
        load_settings(write(tmp_path, wrapper % ""))
    settings = load_settings(write(tmp_path, wrapper % ", advertise: 10.0.0.5"))
    assert settings.wrapper_url("reasoner") == "http://10.0.0.5:9000"
    assert settings.backend_url("chained") == "http://10.0.0.5:9000"
    reasoner = WrapperSettings.from_swarm(settings, "reasoner")
    assert (reasoner.host, reasoner.endpoint) == ("0.0.0.0", "http://10.0.0.5:9000")


def test_the_cli_tries_the_routers_in_order(tmp_path, monkeypatch):
    assert load_settings(write(tmp_path, "router: {port: 7000}\n")).router_urls == [
        "http://127.0.0.1:7000"
    ]
    monkeypatch.setenv("SWARM_ROUTER__URLS", '["http://10.0.0.2:6103/", "http://10.0.0.3:6103"]')
    settings = load_settings(write(tmp_path, ""))
    assert settings.router_urls == ["http://10.0.0.2:6103", "http://10.0.0.3:6103"]


def write(tmp_path: Path, text: str) -> Path:
    profile = tmp_path / "profile.yaml"
    profile.write_text(text)
    return profile


# --- replicas: N copies of a wrapper (and of its embedded host), ports counted up ------------

REPLICAS = """
backends:
  host: {kind: embedded, port: 9100, model: "smollm2:135m"}
  ollama: {kind: ollama, port: 9200}
wrappers:
  reasoner:
    {agent_id: r, name: R, port: 9000, model: "smollm2:135m", backend: host, replicas: 3,
     capabilities: [reasoning], role: reasoner, cost_per_1k_tokens: 0.5}
  chained:
    {agent_id: c, name: C, port: 9010, model: "smollm2:135m", backend: reasoner, replicas: 4,
     capabilities: [classification], role: classifier}
  remote:
    {agent_id: o, name: O, port: 9020, model: "llama3.1:8b", backend: ollama, replicas: 2,
     capabilities: [reasoning], role: reasoner}
"""


def replicas_profile(tmp_path, text: str = REPLICAS):
    profile = tmp_path / "p.yaml"
    profile.write_text(text)
    return load_settings(profile)


def test_each_replica_has_its_port_agent_id_and_backend_and_the_same_model(tmp_path):
    settings = replicas_profile(tmp_path)

    def replicas(name: str) -> list[tuple[int, str, str]]:
        found = []
        for replica in range(1, settings.wrappers[name].replicas + 1):
            wrapper = WrapperSettings.from_swarm(settings, name, replica)
            assert wrapper.replica == replica
            assert wrapper.endpoint == f"http://127.0.0.1:{wrapper.port}"
            same = (wrapper.model, wrapper.capabilities, wrapper.cost_per_1k_tokens)
            config = settings.wrappers[name]
            assert same == (config.model, config.capabilities, config.cost_per_1k_tokens)
            found.append((wrapper.port, wrapper.agent_id, wrapper.backend_url.rsplit(":", 1)[1]))
        return found

    # An embedded backend: one model host per replica, replica i on the backend's port + i - 1.
    assert settings.backend_replicas("host") == 3
    assert replicas("reasoner") == [
        (9000, "r", "9100"),
        (9001, "r-2", "9101"),
        (9002, "r-3", "9102"),
    ]
    # A wrapper backend: its replica of the same number, its first when it has fewer.
    assert replicas("chained") == [
        (9010, "c", "9000"),
        (9011, "c-2", "9001"),
        (9012, "c-3", "9002"),
        (9013, "c-4", "9000"),
    ]
    # An Ollama backend: the one server, shared (it queues itself).
    assert settings.backend_replicas("ollama") == 1
    assert replicas("remote") == [(9020, "o", "9200"), (9021, "o-2", "9200")]


def test_a_replica_the_entry_does_not_have_is_refused_in_one_line(tmp_path):
    settings = replicas_profile(tmp_path)
    with pytest.raises(ConfigError, match=r"^wrappers.remote.replicas: there is no replica 3 "):
        WrapperSettings.from_swarm(settings, "remote", 3)
    with pytest.raises(ConfigError, match=r"^backends.host: there is no replica 4 "):
        ModelHostSettings.from_swarm(settings, backend="host", replica=4)
    assert ModelHostSettings.from_swarm(settings, backend="host", replica=3).port == 9102


def test_replicas_are_bounded_and_say_their_rules():
    field = WrapperConfig.model_fields["replicas"]
    assert field.default == 1
    for rule in ("port + i - 1", "agent_id-i", "Ollama backend is shared", "its first"):
        assert rule in field.description


WRAPPER = "{{agent_id: {0}, name: {0}, port: {1}, model: m, backend: {2}, capabilities: [c], \
role: r, replicas: {3}}}"


@pytest.mark.parametrize(
    ("profile", "expected"),
    [
        (
            "backends: {a: {kind: embedded, port: 9100, model: m}}\n"
            f"wrappers: {{x: {WRAPPER.format('x', 9000, 'a', 2)}, "
            f"y: {WRAPPER.format('y', 9010, 'a', 1)}}}\n",
            "backends.a: its wrappers give different replicas (x: 2, y: 1): it runs one model "
            "host per replica, so give them the same",
        ),
        (
            "backends: {a: {kind: ollama, port: 9100}}\n"
            f"wrappers: {{x: {WRAPPER.format('x', 9000, 'a', 3)}, "
            f"y: {WRAPPER.format('y', 9002, 'a', 1)}}}\n",
            "wrappers.y.port: port 9002 is already used by wrappers.x.port (replica 3)",
        ),
        (
            "backends: {a: {kind: embedded, port: 9100, model: m}}\n"
            f"wrappers: {{x: {WRAPPER.format('x', 9101, 'a', 2)}}}\n",
            "wrappers.x.port: port 9101 is already used by backends.a.port (replica 2)",
        ),
        (
            "backends: {a: {kind: ollama, port: 9100}}\n"
            f"wrappers: {{x: {WRAPPER.format('x', 65535, 'a', 2)}}}\n",
            "wrappers.x.port (replica 2): port 65536 is over 65535",
        ),
        (
            "backends: {a: {kind: ollama, port: 9100}}\n"
            f"wrappers: {{x: {WRAPPER.format('x', 9000, 'a', 17)}}}\n",
            "wrappers.x.replicas: Input should be less than or equal to 16 (got 17)",
        ),
    ],
)
def test_replicas_that_cannot_run_are_refused_in_one_line(monkeypatch, tmp_path, profile, expected):
    assert (
        refusal(monkeypatch, tmp_path, {}, profile) == f"config {tmp_path / 'p.yaml'}: {expected}"
    )
