"""Health and info answers of the daemons."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

HealthStatus = Literal["healthy", "degraded", "unhealthy"]


class Probe(BaseModel):
    """``GET /healthz`` (``alive``) and ``GET /readyz`` (``ready``, or 503 ``not_ready``)."""

    status: Literal["alive", "ready", "not_ready"]
    reason: str | None = None


class ServiceHealth(BaseModel):
    """``GET /health`` of every daemon; 200 when healthy, 503 otherwise."""

    status: HealthStatus
    service: str
    port: int
    uptime_seconds: float
    reason: str | None = None


class RegistryHealth(ServiceHealth):
    database: Literal["ok", "error"]
    agents: int | None = None


class WrapperHealth(ServiceHealth):
    ollama_backend: str
    model: str
    model_loaded: bool


class HostHealth(ServiceHealth):
    """``GET /health`` of an embedded model host, with its queue.

    The queue's figures are here rather than in ``/api/ps``: that answer is Ollama's shape,
    which has no such fields, and the clients that read it (the official ``ollama`` client,
    the wrapper's own ``/api/ps``) drop the fields they do not know."""

    model: str
    model_loaded: bool
    busy: bool = Field(description="A generation holds the model.")
    load_duration_ms: float
    running: int = Field(ge=0, description="Generations holding the model.")
    queued: int = Field(ge=0, description="Generations admitted, waiting for the model (FIFO).")
    parallel: int = Field(ge=1, description="Generations the model runs at once.")
    max_pending: int = Field(
        ge=1, description="Running plus queued generations admitted at most; then 503."
    )
    service_time_ms: float | None = Field(
        description="Mean time the recent generations held the model; null before the first."
    )
    expected_wait_ms: float = Field(
        ge=0,
        description="How long a generation admitted now would wait for the model: "
        "(running + queued - parallel + 1) x service time / parallel, 0 while a slot is free "
        "(2 s a generation before the first is measured).",
    )


class ModelInfo(BaseModel):
    name: str
    parameters: str | None = None
    quantization: str | None = None
    context_length: int | None = None
    embedding_dim: int | None = None


class Performance(BaseModel):
    """Figures measured live over the recent requests."""

    avg_throughput_tok_s: float | None = None
    avg_latency_ms: float | None = None
    p95_latency_ms: float | None = None


class PromptCache(BaseModel):
    """What the backend said of its prompt cache over the recent calls that ended with its
    counts: of their prompt tokens, how many it read from its cache instead of evaluating
    (Ollama's ``prompt_eval_cached_count``). A backend that does not say counts apart."""

    backend: str
    calls: int = Field(description="Recent calls that ended with the backend's counts.")
    calls_reporting: int = Field(description="Those whose backend said what it read from cache.")
    prompt_tokens: int = Field(description="The prompt tokens of the reporting calls.")
    cached_tokens: int = Field(description="Those the backend read from its cache.")
    cached_share: float | None = Field(description="cached_tokens / prompt_tokens.")


class ServiceInfo(BaseModel):
    """``GET /info`` of a wrapper."""

    service_name: str
    version: str
    model: ModelInfo
    capabilities: list[str]
    performance: Performance
    endpoints: list[str]
    prompt_cache: PromptCache | None = None


class ClassifierInfo(ServiceInfo):
    """``GET /info`` of a wrapper that classifies onto a TMD taxonomy."""

    domain_taxonomy_version: str
    prompt_version: str
