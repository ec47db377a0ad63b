"""The daemons of a profile, in start order, each with how to run it and where it answers."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from schemas.config import SwarmSettings, replica_name


@dataclass(frozen=True)
class Daemon:
    name: str
    argv: tuple[str, ...]
    health_url: str
    # supervisord starts lower priorities first: backends, the registry, wrappers, router.
    priority: int


def daemons(settings: SwarmSettings, python: str = sys.executable) -> list[Daemon]:
    """Every process the profile runs, each replica its own (``wrapper-reasoner-2``, started
    with ``--replica 2``); a real Ollama backend is the user's, not ours."""
    found = []
    for name, backend in settings.backends.items():
        if backend.kind == "embedded":
            for replica in range(1, settings.backend_replicas(name) + 1):
                url = settings.local_url(backend.host, backend.port + replica - 1)
                argv = (python, "-m", "services.modelhost", "--backend", name, *_flag(replica))
                daemon = replica_name(f"modelhost-{name}", replica)
                found.append(Daemon(daemon, argv, f"{url}/health", 10))
    registry = (python, "-m", "registry")
    found.append(Daemon("registry", registry, f"{settings.registry_url}/health", 20))
    for name, wrapper in settings.wrappers.items():
        for replica in range(1, wrapper.replicas + 1):
            url = settings.local_url(wrapper.host, wrapper.port + replica - 1)
            argv = (python, "-m", "services", name, *_flag(replica))
            daemon = replica_name(f"wrapper-{name}", replica)
            found.append(Daemon(daemon, argv, f"{url}/health", 30))
    router = (python, "-m", "router")
    found.append(Daemon("router", router, f"{settings.router_url}/health", 40))
    return found


def _flag(replica: int) -> tuple[str, ...]:
    # The replica's number, never a copy of its config: the profile stays the one source.
    return () if replica == 1 else ("--replica", str(replica))


def external_backends(settings: SwarmSettings) -> dict[str, str]:
    """Backends the swarm expects to find running (a real Ollama, an OpenAI-compatible
    server): name -> the URL its wrappers call."""
    return {
        name: settings.server_url(name)
        for name, backend in settings.backends.items()
        if backend.kind != "embedded"
    }
