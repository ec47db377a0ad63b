"""The daemons of a profile, in start order, each with how to run it and where it answers;
and which of them one host runs (its part: a role, and its address in the profile).

A profile can describe a fleet: every registry, router, wrapper and backend section has its
``host``. ``swarm up --role control`` runs the registry and the router (bound to ``--host``
when given: each control host its own replica of both); ``--role node`` runs the model
hosts and wrappers whose address is ``--host``, else any address of this machine (a
wrapper's address is its ``advertise``, else its ``host``; a section on an any-address
belongs to every node); ``--role all`` (the default) runs every daemon, as on one machine.
"""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass
from typing import Literal

from schemas.config import SwarmSettings, is_unspecified, replica_name

Role = Literal["all", "control", "node"]
ROLES: tuple[Role, ...] = ("all", "control", "node")


@dataclass(frozen=True)
class Daemon:
    name: str
    argv: tuple[str, ...]
    health_url: str
    # supervisord starts lower priorities first: backends, the registry, wrappers, router.
    priority: int
    section: str = ""  # its profile section: "registry", "backends.smollm2", "wrappers.x"
    role: Role = "node"  # "control" or "node"
    address: str = "127.0.0.1"  # where it is in the fleet: the host that runs it


@dataclass(frozen=True)
class Part:
    """What one host runs: its role, and its address in the profile (None: any of this
    machine's, for a node; the profile's own hosts, for the control daemons)."""

    role: Role = "all"
    host: str | None = None

    def runs(self, daemon: Daemon) -> bool:
        if self.role not in ("all", daemon.role):
            return False
        if daemon.role == "control":  # placed by --host, not picked by it
            return True
        if is_unspecified(daemon.address):
            return True
        if self.host is not None:
            return daemon.address == self.host
        return self.role == "all" or is_this_machine(daemon.address)

    def describe(self) -> str:
        return self.role + (f" on {self.host}" if self.host else "")


EVERYTHING = Part()


def daemons(
    settings: SwarmSettings, python: str = sys.executable, part: Part = EVERYTHING
) -> list[Daemon]:
    """The processes ``part`` runs (by default every one of the profile), each replica its
    own (``wrapper-reasoner-2``, started with ``--replica 2``); a real Ollama backend is the
    user's, not ours."""
    found = []
    for name, backend in settings.backends.items():
        if backend.kind == "embedded":
            for replica in range(1, settings.backend_replicas(name) + 1):
                url = settings.local_url(backend.host, backend.port + replica - 1)
                argv = (python, "-m", "services.modelhost", "--backend", name, *_flag(replica))
                daemon = replica_name(f"modelhost-{name}", replica)
                address = backend.host or settings.host
                found.append(
                    Daemon(daemon, argv, f"{url}/health", 10, f"backends.{name}", "node", address)
                )
    found.append(_control(settings, "registry", python, part.host, 20))
    for name, wrapper in settings.wrappers.items():
        for replica in range(1, wrapper.replicas + 1):
            url = settings.local_url(wrapper.host, wrapper.port + replica - 1)
            argv = (python, "-m", "services", name, *_flag(replica))
            daemon = replica_name(f"wrapper-{name}", replica)
            address = settings.wrapper_address(name)
            found.append(
                Daemon(daemon, argv, f"{url}/health", 30, f"wrappers.{name}", "node", address)
            )
    found.append(_control(settings, "router", python, part.host, 40))
    return [daemon for daemon in found if part.runs(daemon)]


def _control(
    settings: SwarmSettings, name: str, python: str, host: str | None, priority: int
) -> Daemon:
    """The registry or the router: on the profile's host, or bound to ``host`` (a control
    host of several, each running its replica on the profile's port)."""
    section = settings.registry if name == "registry" else settings.router
    default_url = settings.registry_url if name == "registry" else settings.router_url
    argv: tuple[str, ...] = (python, "-m", name)
    if host is None:
        return Daemon(
            name,
            argv,
            f"{default_url}/health",
            priority,
            name,
            "control",
            section.host or settings.host,
        )
    url = settings.local_url(host, section.port)
    return Daemon(name, (*argv, "--host", host), f"{url}/health", priority, name, "control", host)


def is_this_machine(address: str) -> bool:
    """Whether ``address`` is one of this machine's: one a socket can bind here (every
    127.x is; a name is resolved as the bind would)."""
    try:
        with socket.socket(_family(address), socket.SOCK_STREAM) as probe:
            probe.bind((address.strip("[]"), 0))
    except OSError:
        return False
    return True


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def _flag(replica: int) -> tuple[str, ...]:
    # The replica's number, never a copy of its config: the profile stays the one source.
    return () if replica == 1 else ("--replica", str(replica))


def external_backends(settings: SwarmSettings, part: Part = EVERYTHING) -> dict[str, str]:
    """Backends the swarm expects to find running (a real Ollama, an OpenAI-compatible
    server): name -> the URL its wrappers call. For a part, those behind its wrappers."""
    used = {w.backend for w in settings.wrappers.values()}
    if part != EVERYTHING:
        run = {d.section.removeprefix("wrappers.") for d in daemons(settings, part=part)}
        used = {w.backend for name, w in settings.wrappers.items() if name in run}
    return {
        name: settings.server_url(name)
        for name, backend in settings.backends.items()
        if backend.kind != "embedded" and (part == EVERYTHING or name in used)
    }
