"""What a wrapper runs with, resolved from the swarm profile (``wrappers.<name>``)."""

from __future__ import annotations

from functools import cached_property
from typing import Any

from pydantic import SecretStr, field_validator

from schemas.agents import Identifier
from schemas.config import SwarmSettings, WrapperConfig
from services.wrapper.translate import CompletionTemplate


class WrapperSettings(WrapperConfig):
    service: Identifier
    host: str = "127.0.0.1"
    backend_url: str
    registry_url: str
    registry_token: SecretStr | None = None
    endpoint: str

    @field_validator("prompts")
    @classmethod
    def _check_template(cls, prompts: dict[str, Any]) -> dict[str, Any]:
        CompletionTemplate.from_prompts(prompts)  # a bad template stops the start-up
        return prompts

    @cached_property
    def completion_template(self) -> CompletionTemplate:
        return CompletionTemplate.from_prompts(self.prompts)

    @classmethod
    def from_swarm(cls, swarm: SwarmSettings, name: str, **overrides) -> WrapperSettings:
        config = swarm.wrappers[name]
        given = {k: v for k, v in overrides.items() if v is not None}
        host = given.get("host") or config.host or swarm.host
        port = given.get("port") or config.port
        values = config.model_dump() | {
            "service": name,
            "host": host,
            "backend_url": swarm.backend_url(name),
            "registry_url": swarm.registry_url,
            "registry_token": swarm.registry_token,
            "endpoint": swarm.local_url(host, port),
        }
        return cls(**values | given)
