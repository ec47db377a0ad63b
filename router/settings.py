"""What the router runs with, resolved from the swarm profile (``router:``, ``providers:``)."""

from __future__ import annotations

import os
from functools import cached_property

from pydantic import Field, SecretStr

from schemas.config import ProviderConfig, RouterConfig, SwarmSettings


class RouterSettings(RouterConfig):
    host: str = "127.0.0.1"
    registry_url: str
    registry_urls: list[str] | None = Field(
        default=None,
        description="The registry replicas the directory reads, tried in order (profile "
        "registry.urls); None: registry_url alone.",
    )
    database_url: str  # of the usage records
    registry_token: SecretStr | None = None
    providers: dict[str, ProviderConfig] = {}

    @classmethod
    def from_swarm(cls, swarm: SwarmSettings, **overrides) -> RouterSettings:
        given = {k: v for k, v in overrides.items() if v is not None}
        values = swarm.router.model_dump() | {
            "host": swarm.router.host or swarm.host,
            "registry_url": swarm.registry_urls[0],
            "registry_urls": swarm.registry_urls,
            "database_url": swarm.sqlite_url("usage"),
            "registry_token": swarm.registry_token,
            "providers": swarm.providers,
        }
        return cls(**values | given)

    @property
    def registries(self) -> list[str]:
        """The registries the directory reads, first tried first."""
        return self.registry_urls or [self.registry_url]

    @cached_property
    def keyed_providers(self) -> dict[str, ProviderConfig]:
        """Cloud providers whose key is set at start: the only ones ever called. Read once,
        not per request (a key set later needs a restart, as any environment variable)."""
        return {
            name: provider
            for name, provider in self.providers.items()
            if os.environ.get(provider.api_key_env)
        }
