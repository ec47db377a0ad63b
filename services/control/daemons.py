"""The daemons of a profile, in start order, each with how to run it and where it answers."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from schemas.config import SwarmSettings


@dataclass(frozen=True)
class Daemon:
    name: str
    argv: tuple[str, ...]
    health_url: str
    # supervisord starts lower priorities first: backends, the registry, wrappers, router.
    priority: int


def daemons(settings: SwarmSettings, python: str = sys.executable) -> list[Daemon]:
    """Every process the profile runs; a real Ollama backend is the user's, not ours."""
    found = []
    for name, backend in settings.backends.items():
        if backend.kind == "embedded":
            url = settings.local_url(backend.host, backend.port)
            argv = (python, "-m", "services.modelhost", "--backend", name)
            found.append(Daemon(f"modelhost-{name}", argv, f"{url}/health", 10))
    registry = (python, "-m", "registry")
    found.append(Daemon("registry", registry, f"{settings.registry_url}/health", 20))
    for name, wrapper in settings.wrappers.items():
        url = settings.local_url(wrapper.host, wrapper.port)
        argv = (python, "-m", "services", name)
        found.append(Daemon(f"wrapper-{name}", argv, f"{url}/health", 30))
    router = (python, "-m", "router")
    found.append(Daemon("router", router, f"{settings.router_url}/health", 40))
    return found


def external_backends(settings: SwarmSettings) -> dict[str, str]:
    """Backends the swarm expects to find running (a real Ollama): name -> URL."""
    return {
        name: settings.local_url(backend.host, backend.port)
        for name, backend in settings.backends.items()
        if backend.kind == "ollama"
    }
