"""The swarm configuration: one profile file, validated once, shared by every daemon.

A profile (``config/swarm.yaml`` by default, ``SWARM_CONFIG`` to pick another) describes
the whole topology. ``SWARM_*`` environment variables override single values, with
``__`` between nested keys (``SWARM_REGISTRY__PORT=7000``,
``SWARM_WRAPPERS__REASONER__PORT=9050``); the documented top-level names
``SWARM_DATABASE_URL``, ``SWARM_REGISTRY_TOKEN`` and ``SWARM_REGISTRY_TOKEN_FILE`` are plain
fields.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from schemas.agents import DEFAULT_TIER, Capability, Endpoint, Identifier, Locality, Tier, Token
from schemas.errors import describe_validation_errors

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PROFILE = PROJECT_ROOT / "config" / "swarm.yaml"

Port = Annotated[int, Field(ge=1, le=65535)]
Seconds = Annotated[float, Field(gt=0, le=86_400)]
MAX_REPLICAS = 16


class ConfigError(Exception):
    """A profile that cannot be used; the message is one line naming the key."""


# An empty value is refused, never read as "unset": `SWARM_HOST=` binding every interface,
# `SWARM_DATA_DIR=` writing state into the working directory or an empty token turning
# writes into 401s would all be silent. Leaving the key out gives the default.
def _refuse_empty(default: str):
    def check(value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            raise ValueError(f"is empty; leave it out for {default}")
        return value

    return BeforeValidator(check)


Host = Annotated[str, _refuse_empty("the default host")]
SectionHost = Annotated[str, _refuse_empty("the profile's host")]


def _check_token(value: Any) -> Any:
    # Headers carry no surrounding whitespace, so a token with some could never match.
    if isinstance(value, str | SecretStr):
        text = value if isinstance(value, str) else value.get_secret_value()
        if not text.strip():
            raise ValueError(
                "SWARM_REGISTRY_TOKEN is set but empty: unset it to run without a token, "
                "or give the token writes must carry"
            )
        return text.strip()
    return value


def read_token_file(path: Path) -> str:
    """The token a file holds (``swarm up`` writes one); unreadable or empty is an error,
    never "no token": a daemon must not start open because its token went missing."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise ValueError(f"registry_token_file: cannot read {path}: {reason}") from None
    if not token:
        raise ValueError(f"registry_token_file: {path} is empty")
    return token


def _check_database_url(value: Any) -> Any:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(
                "SWARM_DATABASE_URL is set but empty: unset it for SQLite files under data_dir"
            )
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            make_url(value.strip())
        except ArgumentError:
            raise ValueError(
                "is not a database URL (dialect+driver://user@host/name, e.g. "
                "postgresql+psycopg://swarm@db/swarm)"
            ) from None
        return value.strip()
    return value


def _check_allowlist_entry(entry: str) -> str:
    entry = entry.strip().lower()
    if not entry:
        raise ValueError("empty allowlist entry")
    if "/" in entry:
        ipaddress.ip_network(entry, strict=False)  # raises ValueError with the reason
    return entry


AllowlistEntry = Annotated[str, AfterValidator(_check_allowlist_entry)]


def _some_host(entries: list[str]) -> list[str]:
    if not entries:
        raise ValueError("is empty: no agent could register; leave it out for loopback only")
    return entries


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RegistryConfig(Section):
    host: SectionHost | None = None
    port: Port = 6121
    url: Annotated[Endpoint, _refuse_empty("http://host:port")] | None = Field(
        default=None, description="Where clients reach the registry; default http://host:port."
    )
    urls: list[Endpoint] | None = Field(
        default=None,
        min_length=1,
        max_length=16,
        description="Registry replicas on one database, in the order wrappers and routers "
        "try them: each goes to the next on a connection failure or a 5xx. Default: the "
        "one registry at url. From the environment as a JSON list: "
        'SWARM_REGISTRY__URLS=\'["http://10.0.0.2:6121","http://10.0.0.3:6121"]\'.',
    )
    ttl_seconds: Seconds = 30.0
    reap_after_seconds: Seconds = Field(
        default=300.0, description="Grace after expiry before a critical agent is removed."
    )
    reap_interval_seconds: Seconds = 5.0
    endpoint_allowlist: Annotated[list[AllowlistEntry], AfterValidator(_some_host)] = Field(
        default_factory=lambda: ["127.0.0.0/8", "::1", "localhost"],
        max_length=256,
        description="The hosts agents' endpoints may name: names, *.suffix, IPs and CIDR "
        "networks. The default admits loopback endpoints only: a fleet lists its networks "
        "(['10.0.0.0/24']). An any-address endpoint (0.0.0.0) is refused whatever this says. "
        "Empty is an error, not 'nobody'.",
    )
    max_body_bytes: int = Field(default=65_536, ge=1_024, le=16 * 1024 * 1024)
    max_page_size: int = Field(default=1_000, ge=1, le=100_000)


class BackendConfig(Section):
    """A model backend: a real Ollama or the embedded model host (the Ollama API), or an
    OpenAI-compatible server (``kind: openai``: llama.cpp's llama-server, vLLM, LM Studio,
    llama-cpp-python's server).

    An Ollama or OpenAI-compatible server is described once, however many models it serves:
    each wrapper names the model it serves on it. An embedded host loads one model, named here.
    """

    kind: Literal["embedded", "ollama", "openai"]
    host: SectionHost | None = None
    port: Port | None = Field(default=None, description="Required, but for an openai url.")
    url: Annotated[Endpoint, _refuse_empty("http://host:port/v1")] | None = Field(
        default=None,
        description="An openai backend: its base URL as OpenAI clients take it "
        "(http://gpu-box:8000/v1); instead of host and port (then http://host:port/v1).",
    )
    api_key_env: str | None = Field(
        default=None,
        pattern=r"^[A-Z_][A-Z0-9_]*$",
        description="An openai backend: the environment variable holding its API key, sent "
        "as a bearer token (never logged); unset: no key.",
    )
    model: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="Embedded host: the model it loads (required). Not for an Ollama server.",
    )
    context_length: int = Field(
        default=2_048, ge=128, le=131_072, description="Embedded host: the context it loads."
    )
    threads: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="Embedded host: llama.cpp threads (default: all cores but one).",
    )
    max_pending: int = Field(
        default=64,
        ge=1,
        le=100_000,
        description="Embedded host: generations admitted at once, running and queued; one "
        "more is a 503 with a Retry-After from the measured service time.",
    )

    @model_validator(mode="after")
    def _check_model(self) -> BackendConfig:
        if self.kind == "embedded" and self.model is None:
            raise ValueError("an embedded backend needs a model: the one it loads")
        if self.kind == "ollama" and self.model is not None:
            raise ValueError(
                "an Ollama backend takes no model: each wrapper names the model it serves on it"
            )
        if self.kind == "openai" and self.model is not None:
            raise ValueError(
                "an openai backend takes no model: each wrapper names the model it serves on it"
            )
        return self

    @model_validator(mode="after")
    def _check_address(self) -> BackendConfig:
        kind = "an Ollama" if self.kind == "ollama" else f"an {self.kind}"
        if self.kind != "openai":
            if self.port is None:
                raise ValueError(f"{kind} backend needs a port")
            if self.url is not None or self.api_key_env is not None:
                raise ValueError(f"{kind} backend takes no url or api_key_env: an openai one does")
        elif self.url is None and self.port is None:
            raise ValueError("an openai backend needs a url (http://host:port/v1) or a port")
        elif self.url is not None and self.port is not None:
            raise ValueError("an openai backend takes a url or a port, not both")
        elif self.url is not None and self.host is not None:
            raise ValueError("an openai backend with a url takes no host: the url names it")
        return self

    @property
    def openai_url(self) -> str | None:
        """An openai backend's base URL when its profile gives one (else host and port)."""
        return self.url.rstrip("/") if self.url else None


class WrapperConfig(Section):
    """One model service. Adding a model to the swarm is adding one of these."""

    agent_id: Identifier
    name: str = Field(min_length=1, max_length=128)
    host: SectionHost | None = None
    advertise: SectionHost | None = Field(
        default=None,
        description="The address routers and other hosts reach this wrapper at, which it "
        "registers as its endpoint; default its host. Required when it binds an any-address "
        "(0.0.0.0, ::), which no other machine can call.",
    )
    port: Port
    model: str = Field(min_length=1, max_length=200)
    backend: str = Field(
        min_length=1, description="Name of a backend entry, or the name of another wrapper."
    )
    prompt_style: Literal["chat", "completion"] = "chat"
    capabilities: list[Capability] = Field(min_length=1, max_length=32)
    tier: Tier = Field(default=DEFAULT_TIER, description="The spec's integer level.")
    locality: Locality = Field(
        default="local", description='"cloud" for a wrapper whose calls leave the machines.'
    )
    role: Token
    cost_per_1k_tokens: float = Field(default=0.0, ge=0)
    context_length: int | None = Field(default=None, ge=128)
    max_tokens_limit: int = Field(default=2_048, ge=1)
    parallel: int = Field(
        default=1,
        ge=1,
        le=1_024,
        description="Calls an Ollama backend serves at once: its OLLAMA_NUM_PARALLEL (1 by "
        "default, as Ollama's own). The wrapper reports it and reckons its expected wait with "
        "it. An embedded host serves one call at a time, whatever this says.",
    )
    replicas: int = Field(
        default=1,
        ge=1,
        le=MAX_REPLICAS,
        description="Copies of this service, each its own agent the router balances: replica "
        "i (1..N) listens on port + i - 1 and registers as agent_id-i (the first as agent_id), "
        "same model, capabilities and cost. An embedded backend runs one model host per "
        "replica, replica i's on the backend's port + i - 1, so every wrapper of one embedded "
        "backend must give the same replicas; an Ollama backend is shared by all replicas (it "
        "queues itself); a wrapper backend: replica i calls its replica i, or its first when "
        "it has fewer.",
    )
    probe_embedding: bool = Field(
        default=True,
        description="Register the embedding capability when a real one-input embed on the "
        "backend succeeds (a profile may also list it). Off for a chat model beside a "
        "dedicated embedder: vectors of two models do not compare, so capability:embedding "
        "should reach one of them only.",
    )
    prompts: dict[str, Any] = Field(default_factory=dict)
    taxonomy: Path | None = Field(
        default=None,
        description="A TMD taxonomy file (relative: to the profile's directory). The wrapper "
        "then also classifies queries onto it: /classify_domain, /extract_tmd, /validate_domain.",
    )
    connect_timeout_seconds: Seconds = 5.0
    read_timeout_seconds: Seconds = 300.0
    heartbeat_interval_seconds: Seconds = Field(
        default=10.0, description="Keep well under registry.ttl_seconds."
    )
    max_body_bytes: int = Field(default=1_048_576, ge=1_024, le=64 * 1024 * 1024)


class ProviderConfig(Section):
    """A cloud provider; a candidate only while the env var named by api_key_env holds a
    key (set but empty counts as unset, as for the providers' own clients)."""

    kind: Literal["openai", "anthropic"]
    base_url: str
    api_key_env: str = Field(pattern=r"^[A-Z_][A-Z0-9_]*$")
    models: dict[Capability, str] = Field(description="capability -> model name")
    price_per_1k_input: float = Field(ge=0)
    price_per_1k_output: float = Field(ge=0)


class RouterConfig(Section):
    host: SectionHost | None = None
    port: Port = 6103
    urls: list[Endpoint] | None = Field(
        default=None,
        min_length=1,
        max_length=16,
        description="Router replicas, in the order the swarm CLI tries them: it goes to the "
        "next when one does not answer (an HTTP answer, even a 5xx, is the answer). Default: "
        "the one router at host:port. From the environment as a JSON list: "
        'SWARM_ROUTER__URLS=\'["http://10.0.0.2:6103","http://10.0.0.3:6103"]\'.',
    )
    capability_fallbacks: dict[Capability, list[Capability]] = Field(default_factory=dict)
    max_local_wait_ms: dict[Capability, Annotated[int, Field(ge=1, le=86_400_000)]] = Field(
        default_factory=dict,
        description="A wait budget per capability (ms): a call goes first to the candidates "
        "whose expected wait is within it, and spills to the next one (a fallback "
        "capability, a cloud provider) when every better one is over it. A caller's "
        "X-Max-Wait-Ms header wins. Unset: no budget, nothing spills.",
    )
    reference_price_per_1k_tokens: float = Field(
        default=0.002, ge=0, description="What the dashboard's 'saved' prices tokens at; 0: none."
    )
    reference_embedding_price_per_1k_tokens: float = Field(
        default=0.00002,
        ge=0,
        description="What the dashboard's 'saved' prices embedding tokens at (OpenAI's "
        "text-embedding-3-small: $0.02 per million); 0: none.",
    )
    discovery_refresh_seconds: Seconds = Field(
        default=1.0, description="How often the router re-reads the registry's agents."
    )
    max_attempts: int = Field(
        default=3, ge=1, le=20, description="Attempts one call may make before a 503."
    )
    retry_wait_max_seconds: float = Field(
        default=2.0,
        ge=0,
        le=60,
        description="After every candidate failed, retry only if the wait (backoff with "
        "jitter, or a 429's Retry-After) is at most this; 0: never retry.",
    )
    connect_timeout_seconds: Seconds = 2.0
    read_timeout_seconds: Seconds = Field(
        default=300.0, description="Until an upstream's first byte, and between two chunks."
    )
    breaker_failures: int = Field(
        default=3, ge=1, description="Consecutive failures that open an endpoint's circuit."
    )
    breaker_failure_rate: float = Field(
        default=0.5, gt=0, le=1, description="...or this share of the recent calls failing."
    )
    breaker_window: int = Field(default=20, ge=2, le=1_000)
    breaker_cooldown_seconds: Seconds = Field(
        default=5.0, description="How long a circuit stays open before one trial call."
    )
    max_body_bytes: int = Field(default=1_048_576, ge=1_024, le=64 * 1024 * 1024)
    usage_retention_days: float = Field(default=90, gt=0, le=3_650)
    rate_limit_per_second: float = Field(
        default=50.0,
        ge=0,
        description="Model calls a second per client (API key or address); 0 turns it off.",
    )
    rate_limit_burst: int = Field(default=100, ge=1)


class ServerConfig(Section):
    """What every daemon's HTTP server allows a connection: how long it may sit idle or
    take over its headers and body, and how large its headers may be."""

    keep_alive_seconds: Seconds = Field(
        default=30.0,
        description="A connection idle this long (after an answer, or silent since it "
        "opened) is closed. Above the idle time of the swarm's own clients (aiohttp 15 s, "
        "httpx 5 s), so they always drop a pooled connection first, never race a close.",
    )
    header_timeout_seconds: Seconds = Field(
        default=10.0,
        description="A request line and headers must arrive within this from the "
        "request's first byte; else 408 and the connection is closed.",
    )
    body_timeout_seconds: Seconds = Field(
        default=30.0,
        description="The longest wait for the next part of a request body; else 408 "
        "(or, once the answer has begun, the connection is closed).",
    )
    max_header_bytes: int = Field(
        default=32_768,
        ge=1_024,
        le=1_048_576,
        description="Request line and headers together; more is a 431 and a close.",
    )


class SwarmSettings(BaseSettings):
    """The whole profile, after ``SWARM_*`` overrides."""

    model_config = SettingsConfigDict(
        env_prefix="SWARM_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    host: Host = "127.0.0.1"
    data_dir: Annotated[Path, _refuse_empty("the user's data directory")] | None = Field(
        default=None, description="State (databases, logs); default: the user's data directory."
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    database_url: Annotated[str, BeforeValidator(_check_database_url)] | None = Field(
        default=None, description="Any SQLAlchemy URL; default: SQLite files under data_dir."
    )
    registry_token: Annotated[SecretStr, BeforeValidator(_check_token)] | None = Field(
        default=None,
        description="Registry writes and usage reports need it when set; unset: no token "
        "(unless registry_token_file names one).",
    )
    registry_token_file: Annotated[Path, _refuse_empty("no token file")] | None = Field(
        default=None,
        description="A file holding the token, read at start (how `swarm up` hands its "
        "daemons the token it generated); registry_token, when set, wins.",
    )

    registry: RegistryConfig = RegistryConfig()
    router: RouterConfig = RouterConfig()
    server: ServerConfig = ServerConfig()
    backends: dict[Identifier, BackendConfig] = Field(default_factory=dict)
    wrappers: dict[Identifier, WrapperConfig] = Field(default_factory=dict)
    providers: dict[Identifier, ProviderConfig] = Field(default_factory=dict)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The profile arrives as init kwargs; the environment overrides it.
        return env_settings, init_settings

    @model_validator(mode="before")
    @classmethod
    def _read_token_file(cls, data: Any) -> Any:
        # The token itself, never its path, is what the daemons compare and send.
        if isinstance(data, dict) and data.get("registry_token") is None:
            path = data.get("registry_token_file")
            if isinstance(path, str | Path) and str(path).strip():
                data = data | {"registry_token": read_token_file(Path(path))}
        return data

    @model_validator(mode="after")
    def _check_topology(self) -> SwarmSettings:
        for name, backend in self.backends.items():
            asked = {w: c.replicas for w, c in self.wrappers.items() if c.backend == name}
            if backend.kind == "embedded" and len(set(asked.values())) > 1:
                counts = ", ".join(f"{w}: {n}" for w, n in asked.items())
                raise ValueError(
                    f"backends.{name}: its wrappers give different replicas ({counts}): it runs "
                    "one model host per replica, so give them the same"
                )
        seen: dict[tuple[str, int], str] = {}
        for key, host, port in self._listeners():
            other = seen.setdefault((host, port), key)
            if other != key:
                hint = ""
                if _is_ollama(self, key) and _is_ollama(self, other):
                    hint = ": describe the server once and name each model in its wrappers"
                raise ValueError(f"{key}: port {port} is already used by {other}{hint}")
        for name, wrapper in self.wrappers.items():
            if is_unspecified(self.wrapper_address(name)):
                raise ValueError(
                    f"wrappers.{name}.advertise: it binds {wrapper.host or self.host}, an "
                    "any-address no router can call: give the address it is reached at"
                )
            if wrapper.backend not in self.backends and wrapper.backend not in self.wrappers:
                raise ValueError(
                    f"wrappers.{name}.backend: {wrapper.backend!r} names no backend or wrapper"
                )
            if wrapper.backend == name:
                raise ValueError(f"wrappers.{name}.backend: a wrapper cannot be its own backend")
            backend = self.backends.get(wrapper.backend)
            if backend is not None and backend.model not in (None, wrapper.model):
                raise ValueError(
                    f"wrappers.{name}.model: {wrapper.model!r} is not the model of the embedded "
                    f"backend {wrapper.backend!r} ({backend.model!r})"
                )
        return self

    def _listeners(self):
        yield "registry.port", self.registry.host or self.host, self.registry.port
        yield "router.port", self.router.host or self.host, self.router.port
        for name, backend in self.backends.items():
            if backend.port is None:  # an openai backend given by url: not on our hosts
                continue
            for replica in range(1, self.backend_replicas(name) + 1):
                key = _replica_key(f"backends.{name}.port", replica)
                yield key, backend.host or self.host, _replica_port(key, backend.port, replica)
        for name, wrapper in self.wrappers.items():
            for replica in range(1, wrapper.replicas + 1):
                key = _replica_key(f"wrappers.{name}.port", replica)
                yield key, wrapper.host or self.host, _replica_port(key, wrapper.port, replica)

    @property
    def state_dir(self) -> Path:
        if self.data_dir is not None:
            return self.data_dir
        import platformdirs

        return Path(platformdirs.user_data_dir("local-llm-swarm", appauthor=False))

    def sqlite_url(self, name: str) -> str:
        """The database URL for one store: SWARM_DATABASE_URL, else a SQLite file."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.state_dir / f'{name}.db'}"

    @property
    def registry_url(self) -> str:
        if self.registry.url:
            return self.registry.url.rstrip("/")
        return self.local_url(self.registry.host, self.registry.port)

    @property
    def registry_urls(self) -> list[str]:
        """The registries wrappers and routers use, first tried first."""
        if self.registry.urls:
            return [url.rstrip("/") for url in self.registry.urls]
        return [self.registry_url]

    @property
    def router_url(self) -> str:
        return self.local_url(self.router.host, self.router.port)

    @property
    def router_urls(self) -> list[str]:
        """The routers the swarm CLI uses, first tried first."""
        if self.router.urls:
            return [url.rstrip("/") for url in self.router.urls]
        return [self.router_url]

    def wrapper_address(self, name: str) -> str:
        """The address ``wrappers.<name>`` is reached at from other hosts (and registers):
        its advertise, else the address it binds."""
        wrapper = self.wrappers[name]
        return wrapper.advertise or wrapper.host or self.host

    def wrapper_url(self, name: str, replica: int = 1) -> str:
        """Where a replica of ``wrappers.<name>`` is reached: its advertised address."""
        return self.local_url(self.wrapper_address(name), self.wrappers[name].port + replica - 1)

    def local_url(self, host: str | None, port: int) -> str:
        """Where a daemon of this profile is reached: its own host or the profile's."""
        return f"http://{_url_host(host or self.host)}:{port}"

    def backend_replicas(self, name: str) -> int:
        """Model hosts ``backends.<name>`` runs: its wrappers' replicas (the topology check
        makes them agree), 1 when none names it; always 1 for an Ollama server (it is shared)."""
        backend = self.backends[name]
        asked = [w.replicas for w in self.wrappers.values() if w.backend == name]
        return max(asked, default=1) if backend.kind == "embedded" else 1

    def server_url(self, backend: str) -> str:
        """Where a server the swarm does not run is reached: an Ollama's root, an openai
        server's base URL (its profile's ``url``, else http://host:port/v1)."""
        found = self.backends[backend]
        if found.kind == "openai" and found.openai_url:
            return found.openai_url
        root = self.local_url(found.host, found.port or 0)
        return root + "/v1" if found.kind == "openai" else root

    def backend_url(self, wrapper: str, replica: int = 1) -> str:
        """The server behind a wrapper's replica: a backend entry (an embedded one's model
        host of the same replica, the one Ollama server, an openai server's base URL), or
        another wrapper (its replica of the same number, else its first)."""
        name = self.wrappers[wrapper].backend
        backend = self.backends.get(name)
        if backend is not None and backend.kind == "embedded":
            return self.local_url(backend.host, backend.port + replica - 1)
        if backend is not None:
            return self.server_url(name)
        behind = replica if replica <= self.wrappers[name].replicas else 1
        return self.wrapper_url(name, behind)


def replica_name(name: str, replica: int) -> str:
    """A replica's name (a daemon's, an agent_id): the first keeps the name, replica i
    is ``name-i``."""
    return name if replica == 1 else f"{name}-{replica}"


def _replica_key(key: str, replica: int) -> str:
    return key if replica == 1 else f"{key} (replica {replica})"


def _replica_port(key: str, port: int, replica: int) -> int:
    if port + replica - 1 > 65535:
        raise ValueError(f"{key}: port {port + replica - 1} is over 65535")
    return port + replica - 1


def _is_ollama(settings: SwarmSettings, key: str) -> bool:
    """Whether a listener key (``backends.<name>.port``) is an Ollama backend's."""
    section, _, rest = key.partition(".")
    backend = settings.backends.get(rest.rpartition(".")[0]) if section == "backends" else None
    return backend is not None and backend.kind == "ollama"


def is_unspecified(host: str) -> bool:
    """0.0.0.0 or ::: the address a server binds to listen everywhere, never one to call."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def profile_path() -> Path:
    """SWARM_CONFIG, else the default profile; set but empty is an error, not the default."""
    given = os.environ.get("SWARM_CONFIG")
    if given is None:
        return DEFAULT_PROFILE
    if not given.strip():
        raise ConfigError(
            f"SWARM_CONFIG is set but empty: unset it for {DEFAULT_PROFILE}, or name a profile"
        )
    return Path(given)


def load_settings(path: Path | None = None) -> SwarmSettings:
    """Read and validate a profile; raise ConfigError with one line naming the key."""
    path = path or profile_path()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config {path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" line {where.line + 1}" if where else ""
        raise ConfigError(f"config {path}:{line}: not valid YAML") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: the top level must be a mapping")
    _resolve_paths(data, path.parent)
    try:
        return SwarmSettings(**data)
    except ValidationError as exc:
        raise ConfigError(f"config {path}: {describe_validation_errors(exc.errors())}") from None
    except SettingsError as exc:  # a SWARM_* value for a list or mapping that is not JSON
        raise ConfigError(
            f"config {path}: {exc}: SWARM_* values for lists and mappings are JSON, "
            """e.g. SWARM_REGISTRY__ENDPOINT_ALLOWLIST='["localhost"]'"""
        ) from None


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    """File names in a profile are relative to the profile's own directory."""
    token_file = data.get("registry_token_file")
    if isinstance(token_file, str) and token_file.strip():
        data["registry_token_file"] = str(base / data["registry_token_file"])
    wrappers = data.get("wrappers")
    for wrapper in wrappers.values() if isinstance(wrappers, dict) else ():
        if isinstance(wrapper, dict) and isinstance(wrapper.get("taxonomy"), str):
            wrapper["taxonomy"] = str(base / wrapper["taxonomy"])
