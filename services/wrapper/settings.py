"""What a wrapper runs with, resolved from the swarm profile (``wrappers.<name>``)."""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator

from schemas.agents import Identifier
from schemas.config import ConfigError, SwarmSettings, WrapperConfig, replica_name
from schemas.tmd import Taxonomy
from services.wrapper.taxonomy import load_taxonomy
from services.wrapper.translate import CompletionTemplate


class WrapperSettings(WrapperConfig):
    service: Identifier
    host: str = "127.0.0.1"
    backend_url: str
    backend_kind: Literal["ollama", "openai"] = Field(
        default="ollama",
        description="What backend_url speaks: the Ollama API (Ollama, the embedded host, "
        "another wrapper) or an OpenAI-compatible server's /v1.",
    )
    backend_api_key: SecretStr | None = None  # an openai backend's key, from api_key_env
    registry_url: str
    registry_urls: list[str] | None = Field(
        default=None,
        description="The registry replicas, tried in order (profile registry.urls); "
        "None: registry_url alone.",
    )
    usage_url: str | None = None  # the router, where model calls are reported; None: not
    usage_urls: list[str] | None = Field(
        default=None,
        description="The router replicas on one usage store, tried in order (profile "
        "router.urls); None: usage_url alone.",
    )
    registry_token: SecretStr | None = None
    endpoint: str
    replica: int = Field(default=1, ge=1, description="Which of the entry's replicas this is.")

    @field_validator("prompts")
    @classmethod
    def _check_template(cls, prompts: dict[str, Any]) -> dict[str, Any]:
        CompletionTemplate.from_prompts(prompts)  # a bad template stops the start-up
        return prompts

    @field_validator("taxonomy")
    @classmethod
    def _check_taxonomy(cls, taxonomy: Path | None) -> Path | None:
        if taxonomy is not None:
            load_taxonomy(taxonomy)  # a bad taxonomy stops the start-up, naming the key
        return taxonomy

    @property
    def registries(self) -> list[str]:
        """The registries to register with, first tried first."""
        return self.registry_urls or [self.registry_url]

    @property
    def routers(self) -> list[str]:
        """The routers usage is reported to, first tried first; empty when not reported."""
        if self.usage_url is None:
            return []
        return self.usage_urls or [self.usage_url]

    @cached_property
    def tmd_taxonomy(self) -> Taxonomy | None:
        return load_taxonomy(self.taxonomy) if self.taxonomy else None

    @cached_property
    def completion_template(self) -> CompletionTemplate:
        return CompletionTemplate.from_prompts(self.prompts)

    @classmethod
    def from_swarm(
        cls, swarm: SwarmSettings, name: str, replica: int = 1, **overrides
    ) -> WrapperSettings:
        """``wrappers.<name>``'s replica ``replica`` (1..replicas): its own port and agent_id,
        the backend of its number (``SwarmSettings.backend_url``), then ``overrides``."""
        config = swarm.wrappers[name]
        if not 1 <= replica <= config.replicas:
            raise ConfigError(
                f"wrappers.{name}.replicas: there is no replica {replica} (it has "
                f"{config.replicas})"
            )
        given = {k: v for k, v in overrides.items() if v is not None}
        backend = swarm.backends.get(config.backend)
        openai = backend is not None and backend.kind == "openai"
        # A wrapper in front of another wrapper (the TLC classifier) makes no model call
        # of its own: the one behind it reports the call, once.
        chained = config.backend in swarm.wrappers
        host = given.get("host") or config.host or swarm.host
        port = given.get("port") or config.port + replica - 1
        values = config.model_dump() | {
            "agent_id": replica_name(config.agent_id, replica),
            "name": config.name if replica == 1 else f"{config.name} (replica {replica})",
            "replica": replica,
            "service": name,
            "host": host,
            "port": port,
            "backend_url": swarm.backend_url(name, replica),
            "backend_kind": "openai" if openai else "ollama",
            # Set but empty counts as unset, as for the providers' own clients.
            "backend_api_key": (os.environ.get(backend.api_key_env or "") or None)
            if openai
            else None,
            "registry_url": swarm.registry_urls[0],
            "registry_urls": swarm.registry_urls,
            "usage_url": None if chained else swarm.router_urls[0],
            "usage_urls": None if chained else swarm.router_urls,
            "registry_token": swarm.registry_token,
            # What routers on other hosts call: never the any-address it may bind.
            "endpoint": swarm.local_url(config.advertise or host, port),
            "parallel": parallel_slots(swarm, name),
        }
        return cls(**values | given)


def parallel_slots(swarm: SwarmSettings, name: str) -> int:
    """The calls the model behind ``wrappers.<name>`` serves at once: 1 when it is an
    embedded host (one call at a time), else the profile's ``parallel`` (default 1, Ollama's
    own OLLAMA_NUM_PARALLEL default), which an Ollama server cannot be asked for. A wrapper
    in front of another (the TLC classifier) counts the slots of the model at the end."""
    backend, seen = swarm.wrappers[name].backend, {name}
    while backend in swarm.wrappers and backend not in seen:
        seen.add(backend)
        backend = swarm.wrappers[backend].backend
    found = swarm.backends.get(backend)
    return 1 if found is not None and found.kind == "embedded" else swarm.wrappers[name].parallel
