"""What the registry runs with, resolved from the swarm profile."""

from __future__ import annotations

from pydantic import SecretStr

from schemas.config import RegistryConfig, SwarmSettings


class RegistrySettings(RegistryConfig):
    host: str = "127.0.0.1"
    database_url: str
    token: SecretStr | None = None

    @classmethod
    def from_swarm(cls, swarm: SwarmSettings, **overrides) -> RegistrySettings:
        values = swarm.registry.model_dump() | {
            "host": swarm.registry.host or swarm.host,
            "database_url": swarm.sqlite_url("registry"),
            "token": swarm.registry_token,
        }
        return cls(**values | {k: v for k, v in overrides.items() if v is not None})
