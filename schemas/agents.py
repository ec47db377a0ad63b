"""Agents as the registry stores and discovers them."""

from __future__ import annotations

import hashlib
import json
import math
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
)

MAX_CAPABILITIES = 32
MAX_METADATA_KEYS = 64
MAX_METADATA_DEPTH = 16
DEFAULT_PAGE_SIZE = 100
# Discovery answers candidates for a routing decision, which needs a handful, not a page
# (Consul's DNS interface answers 3). Bigger answers are a `limit` away.
DISCOVER_DEFAULT_LIMIT = 20


def _normalize_token(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


# A capability or label as agents declare it: trimmed, lower-case, bounded. The constraints
# come before the normalizing validator, or the published schema loses the pattern.
Capability = Annotated[
    str,
    StringConstraints(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_.:-]*$"),
    BeforeValidator(_normalize_token),
]
Token = Annotated[
    str,
    StringConstraints(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_.-]*$"),
    BeforeValidator(_normalize_token),
]
Identifier = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
]


def _dedupe(values: list[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _check_endpoint(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https"):
        raise ValueError("endpoint must be an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError("endpoint has no host")
    if parts.username or parts.password:
        raise ValueError("endpoint must not carry credentials")
    if parts.query or parts.fragment:
        raise ValueError("endpoint must not have a query or fragment")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"endpoint port is invalid: {exc}") from None
    return value.rstrip("/")


def _check_depth(value: dict[str, Any]) -> dict[str, Any]:
    """Refuse metadata nested deeper than ``MAX_METADATA_DEPTH``: a record is stored as JSON
    and read back by a parser that stops at about 200 levels (issue 13: a registration of
    1.4 KB was stored, then every read of it answered 500)."""
    level, frontier = 1, [value]
    while frontier:
        if level > MAX_METADATA_DEPTH:
            raise ValueError(f"metadata is nested more than {MAX_METADATA_DEPTH} levels deep")
        children = [
            v for item in frontier for v in (item.values() if isinstance(item, dict) else item)
        ]
        frontier = [child for child in children if isinstance(child, dict | list)]
        level += 1
    return value


Metadata = Annotated[
    dict[str, Any], Field(max_length=MAX_METADATA_KEYS), AfterValidator(_check_depth)
]
Capabilities = Annotated[
    list[Capability], Field(max_length=MAX_CAPABILITIES), AfterValidator(_dedupe)
]
Endpoint = Annotated[
    str, StringConstraints(strip_whitespace=True, max_length=2_048), AfterValidator(_check_endpoint)
]
CheckStatus = Literal["passing", "warning", "critical"]


def _refuse_locality_as_tier(value: Any) -> Any:
    # Before the spec's integer tier, "local"/"cloud" went in tier: say where it goes now.
    if isinstance(value, str) and value.strip().lower() in ("local", "cloud"):
        raise ValueError(f"tier is an integer level (e.g. 2); {value.strip()!r} goes in locality")
    return value


# The spec's integer level of an agent in its hierarchy (its model services register 2).
# (The bounds before the validator: after it, the schema says "ge"/"le", which no one reads.)
Tier = Annotated[int, Field(ge=0, le=9), BeforeValidator(_refuse_locality_as_tier)]
DEFAULT_TIER = 2
# Whether a call to the agent stays on the operator's machines or goes to a cloud provider.
Locality = Literal["local", "cloud"]


class Strict(BaseModel):
    """A request body: no unknown fields, and each value of the JSON type the schema says
    (``"include_unhealthy": 0`` or ``"tier": "2"`` is refused, not coerced; an integer
    stays a valid number)."""

    model_config = ConfigDict(extra="forbid", strict=True)


MAX_MILLISECONDS = 86_400_000.0  # a day: the longest time a load reports
Count = Annotated[int, Field(ge=0, le=1_000_000)]
Milliseconds = Annotated[float, Field(ge=0, le=MAX_MILLISECONDS)]


def expected_wait_ms(
    in_flight: int, parallel: int, service_ms_per_call: float | None
) -> float | None:
    """How long a new call waits for a slot, in milliseconds; None when it cannot be told.

    The one formula of the expected wait: ``floor(in_flight / parallel) x
    service_ms_per_call``, i.e. ``ceil((in_flight + 1) / parallel) - 1`` whole service times.
    With a slot free (``in_flight < parallel``) a call starts at once: 0. Otherwise the
    calls ahead of it (``in_flight``, queued ones included, served FIFO on ``parallel``
    slots) finish in waves of ``parallel``, and the new call starts when
    ``floor(in_flight / parallel)`` waves have finished. A running call counts a whole
    service time, not what is left of it: the length of a model call varies with its
    prompt and output, so the time it has run says little of the time it has left.
    The router calls it too, with its own count of the calls it has sent.
    """
    if in_flight < parallel:
        return 0.0
    if service_ms_per_call is None:
        return None
    return round(math.floor(in_flight / parallel) * service_ms_per_call, 3)


class AgentLoad(Strict):
    """An agent's load as it reports it with each heartbeat (wrappers: measured from their
    own calls). Every field is optional: a field left out is unknown, never zero."""

    in_flight: Count | None = Field(
        default=None, description="Calls under way, the queued ones included."
    )
    queued: Count | None = Field(
        default=None, description="Of in_flight, the calls waiting for a parallel slot."
    )
    parallel: int | None = Field(
        default=None, ge=1, le=1_024, description="Calls the model serves at once."
    )
    service_ms_per_call: Milliseconds | None = Field(
        default=None,
        description="Recent mean time a call holds a slot, from its start of service to its end.",
    )
    service_ms_per_token: Milliseconds | None = Field(
        default=None, description="Recent slot time per output token (the prompt's time included)."
    )
    expected_wait_ms: Milliseconds | None = Field(
        default=None,
        description="How long a new call would wait for a slot (schemas.agents.expected_wait_ms).",
    )


class AgentDefinition(Strict):
    """What a service sends to ``POST /register``."""

    agent_id: Identifier
    name: str = Field(min_length=1, max_length=128)
    tier: Tier = DEFAULT_TIER
    locality: Locality = "local"
    role: Token
    capabilities: Capabilities = Field(min_length=1)
    endpoint: Endpoint
    transport: Token = Field(
        default="http", description='"http", or the spec\'s "rest": both are HTTP.'
    )
    cost_per_1k_tokens: float = Field(default=0.0, ge=0, le=1_000)
    metadata: Metadata = Field(default_factory=dict)
    ttl_seconds: float | None = Field(
        default=None, gt=0, le=86_400, description="Heartbeat TTL; the registry default if unset."
    )


class AgentRecord(BaseModel):
    """An agent as the registry answers it, with liveness computed at read time."""

    agent_id: str
    name: str
    tier: int
    locality: Locality
    role: str
    capabilities: list[str]
    endpoint: str
    transport: str
    cost_per_1k_tokens: float
    metadata: dict[str, Any]
    ttl_seconds: float
    status: CheckStatus
    output: str = ""
    registered_at: datetime
    last_heartbeat: datetime
    expires_at: datetime
    load: AgentLoad | None = Field(
        default=None,
        description="The load of the agent's last heartbeat; null (unknown, not zero) when "
        "it reported none or the report is older than the agent's TTL.",
    )
    load_reported_at: datetime | None = Field(
        default=None, description="When that load was reported (registry clock), stale or not."
    )


def _check_queue(load: AgentLoad | None) -> AgentLoad | None:
    # Checked where an agent reports it, not on every record read back.
    counts = (None, None) if load is None else (load.queued, load.in_flight)
    if None not in counts and counts[0] > counts[1]:
        raise ValueError("queued counts calls of in_flight: it cannot exceed it")
    return load


class Heartbeat(Strict):
    """Optional body of ``POST /heartbeat/{agent_id}``: the agent's own check and live load.

    A heartbeat states the agent's load as of now: one without any leaves it unknown.
    """

    status: CheckStatus = "passing"
    output: str = Field(default="", max_length=1_024)
    load: Annotated[AgentLoad | None, AfterValidator(_check_queue)] = None
    # The load as wrappers before issue 14 sent it; ``load`` wins when both are given.
    in_flight: Count | None = Field(default=None, description="Older form of load.in_flight.")
    latency_ms: Milliseconds | None = Field(
        default=None, description="Older form of load.service_ms_per_call."
    )

    def reported_load(self) -> AgentLoad | None:
        """The load this heartbeat reports, in either form; None when it reports none."""
        if self.load is not None:
            return self.load
        if self.in_flight is None and self.latency_ms is None:
            return None
        return AgentLoad(in_flight=self.in_flight, service_ms_per_call=self.latency_ms)


class HeartbeatAck(BaseModel):
    agent_id: str
    status: CheckStatus
    expires_at: datetime
    fingerprint: str = Field(
        description="Of the definition the registry holds (definition_fingerprint of the "
        "record): an agent whose registration answered another one was replaced, and "
        "registers its own again."
    )


# The stored definition: what a registration sets, with the TTL as the registry resolved it.
DEFINITION_FIELDS = frozenset(AgentDefinition.model_fields)


def definition_fingerprint(definition: AgentDefinition | AgentRecord) -> str:
    """A digest of an agent's definition, its TTL resolved: the registry stores it with each
    registration and answers it with each heartbeat; an agent compares it with the one of
    the record its registration was answered with. Liveness fields take no part."""
    fields = definition.model_dump(mode="json", include=DEFINITION_FIELDS)
    # ASCII escapes: encoding cannot fail, whatever the strings hold (a lone surrogate).
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


class DiscoverRequest(Strict):
    capabilities: Capabilities = Field(default_factory=list)
    match: Literal["all", "any"] = "all"
    tier: Tier | None = None
    locality: Locality | None = None
    role: Token | None = None
    include_unhealthy: bool = False
    limit: int = Field(default=DISCOVER_DEFAULT_LIMIT, ge=1)
    sort: Literal["expected_wait"] | None = Field(
        default=None,
        description='"expected_wait": lowest load.expected_wait_ms first, agents of unknown '
        "load last, ties by agent_id; this orders every match before the limit applies. "
        "Unset: by agent_id, of the first matches found.",
    )


class AgentList(BaseModel):
    agents: list[AgentRecord]
