"""What the model host runs with: command line over the profile's ``backends`` entry."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from schemas.config import ConfigError, Port, SwarmSettings


def default_threads() -> int:
    """All cores but one, at least one.

    llama.cpp's threads meet at a barrier after every layer, so one thread descheduled by
    anything else on the machine (this host's own event loop, the wrapper and router that
    pass each token on, a second model host) stalls them all. Measured on this project's
    2-core machine with SmolLM2: 2 threads give 70 tok/s on an idle machine but 6-26 tok/s
    beside one busy process; 1 thread gives 44 tok/s either way.
    """
    return max(1, (os.cpu_count() or 1) - 1)


class ModelHostSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1, description="A catalog name, e.g. smollm2:135m.")
    host: str = "127.0.0.1"
    port: Port = 11434
    context_length: int = Field(default=2_048, ge=128, le=131_072)
    threads: int | None = Field(
        default=None, ge=1, le=256, description="llama.cpp threads; default: all cores but one."
    )
    batch_size: int = Field(default=512, ge=1, le=8_192, description="Prompt tokens per decode.")
    models_dir: Path = Field(description="Where models assembled from chunks are written.")
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1_024)
    max_pending: int = Field(
        default=64,
        ge=1,
        le=100_000,
        description="Generations admitted at once, the running one and those queued behind it "
        "(first come, first served); one more is answered 503 in Ollama's error shape, with a "
        "Retry-After from the measured time recent generations held the model.",
    )
    max_embed_tokens: int = Field(
        default=16_384,
        ge=1,
        le=1_048_576,
        description="Tokens of one embedding request's inputs all told; more is a 400 (one "
        "request holds the model for all its inputs).",
    )
    prompt_cache: bool = Field(
        default=True,
        description="Keep the prefix a prompt shares with the last one and evaluate only the "
        "rest; off, every generation evaluates its whole prompt, as on a backend whose cache "
        "does not keep it (Ollama with gemma 3).",
    )

    @classmethod
    def from_swarm(
        cls, swarm: SwarmSettings, *, backend: str | None = None, replica: int = 1, **overrides
    ) -> ModelHostSettings:
        """Settings from the profile: a ``backends`` entry when named (its model host of
        number ``replica``, on the entry's port + replica - 1), then ``overrides``."""
        values: dict = {"host": swarm.host, "models_dir": swarm.state_dir / "models"}
        if backend is None and replica != 1:
            raise ConfigError("modelhost: --replica is a replica of a --backend NAME")
        if backend is not None:
            entry = swarm.backends.get(backend)
            if entry is None:
                known = ", ".join(sorted(swarm.backends)) or "none"
                raise ConfigError(f"backends.{backend}: no such backend (the profile has {known})")
            if entry.kind != "embedded":
                raise ConfigError(f"backends.{backend}.kind: {entry.kind!r} is not 'embedded'")
            replicas = swarm.backend_replicas(backend)
            if not 1 <= replica <= replicas:
                raise ConfigError(
                    f"backends.{backend}: there is no replica {replica} (its wrappers give "
                    f"replicas: {replicas})"
                )
            values |= {
                "model": entry.model,
                "host": entry.host or swarm.host,
                "port": entry.port + replica - 1,
                "context_length": entry.context_length,
                "threads": entry.threads,
                "max_pending": entry.max_pending,
            }
        values |= {k: v for k, v in overrides.items() if v is not None}
        if "model" not in values:
            raise ConfigError("modelhost: give --model NAME or --backend NAME")
        return cls(**values)
