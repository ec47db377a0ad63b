"""``swarm``: run the swarm and talk to it from a terminal.

Every command prints a table (or, with ``--json``, the answer as JSON for scripts). An error
is one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from typing import Any, TypeVar

import httpx

from schemas.config import ConfigError, SwarmSettings, load_settings, replica_name
from services.control import swarm
from services.control.daemons import EVERYTHING, ROLES, Part, daemons
from services.control.token_file import token_path

TIMEOUT = httpx.Timeout(10.0, read=300.0)  # a model may take a while to answer
# A router that took no connection never saw the call: the next one may take it. Any other
# failure (a timeout after sending) may have reached a model, so it is not tried twice.
NOT_ANSWERED = (httpx.ConnectError, httpx.ConnectTimeout)
EXIT_ERROR, EXIT_USAGE = 1, 2
Sent = TypeVar("Sent")  # what a request to one replica returns


class CommandFailed(Exception):
    """One line for the user, then exit 1."""


# --- running the swarm ---------------------------------------------------------------------


def part(args: argparse.Namespace) -> Part:
    """This host's part of the fleet, from ``--role`` and ``--host``."""
    return Part(role=args.role, host=args.host)


def cmd_up(settings: SwarmSettings, args: argparse.Namespace) -> int:
    say = lambda line: print(f"==> {line}")  # noqa: E731
    swarm.up(settings, timeout=args.timeout, say=say, part=part(args))
    print_status(settings, args)
    print()
    rows = [*urls(settings, part(args)), ("logs", str(settings.state_dir / "logs"), "")]
    if settings.registry_token is None:  # generated: say where, for outside clients
        rows.append(("token", str(token_path(settings)), "registry writes, usage reports"))
    table(None, [*rows, ("stop with", "./scripts/stop_all.sh", "(or: swarm down)")])
    return 0


def urls(settings: SwarmSettings, part: Part = EVERYTHING) -> list[tuple[str, str, str]]:
    """Where the daemons ``part`` runs are reached: the router, dashboard, registry, and
    each wrapper at the address it advertises."""
    running = {d.name: d.health_url.removesuffix("/health") for d in daemons(settings, part=part)}
    found = []
    if router := running.get("router"):
        found.append(("router", f"{router}/v1", 'OpenAI API, model "capability:<name>"'))
        found.append(("dashboard", f"{router}/dashboard", "costs and latency"))
    if registry := running.get("registry"):
        found.append(("registry", registry, f"agents; docs at {registry}/docs"))
    for name, wrapper in settings.wrappers.items():
        for replica in range(1, wrapper.replicas + 1):
            if replica_name(f"wrapper-{name}", replica) in running:
                url = settings.wrapper_url(name, replica)
                found.append((replica_name(name, replica), f"{url}/v1", f"model {wrapper.model}"))
    return found


def cmd_down(settings: SwarmSettings, args: argparse.Namespace) -> int:
    if not swarm.down(settings, say=print, part=part(args)):
        print("the swarm is not running")
    return 0


def cmd_status(settings: SwarmSettings, args: argparse.Namespace) -> int:
    statuses = print_status(settings, args)
    healthy = all(s.state == "RUNNING" and s.health == "healthy" for s in statuses)
    return 0 if healthy else EXIT_ERROR


def print_status(settings: SwarmSettings, args: argparse.Namespace) -> list[swarm.DaemonStatus]:
    statuses = swarm.status(settings, part(args))
    if args.json:
        emit([asdict(s) for s in statuses])
    else:
        rows = [(s.name, s.state, s.pid or "-", s.health, s.url) for s in statuses]
        table(("DAEMON", "PROCESS", "PID", "HEALTH", "URL"), rows)
    return statuses


def cmd_wait(settings: SwarmSettings, args: argparse.Namespace) -> int:
    swarm.wait_healthy(settings, args.timeout, part=part(args))
    return 0


def cmd_config(settings: SwarmSettings, args: argparse.Namespace) -> int:
    """supervisord's config for the profile, written where ``up`` writes it."""
    print(swarm.write_config(settings, part(args)))
    return 0


# --- talking to it -------------------------------------------------------------------------


def cmd_agents(settings: SwarmSettings, args: argparse.Namespace) -> int:
    params = {"limit": args.limit} | ({"capability": args.capability} if args.capability else {})
    agents = call_registry(settings, "GET", "/agents", params=params)["agents"]
    show_agents(agents, args)
    return 0


def cmd_discover(settings: SwarmSettings, args: argparse.Namespace) -> int:
    body = {"capabilities": [args.capability], "include_unhealthy": args.all}
    agents = discover(settings, body)
    if not agents and not args.json:
        raise CommandFailed(f"no {'' if args.all else 'healthy '}agent has {args.capability!r}")
    show_agents(agents, args)
    return 0 if agents else EXIT_ERROR


def show_agents(agents: list[dict], args: argparse.Namespace) -> None:
    if args.json:
        emit(agents)
        return
    rows = [
        (a["agent_id"], a["status"], a["endpoint"], ",".join(a["capabilities"]), a["name"])
        for a in agents
    ]
    table(("AGENT", "STATUS", "ENDPOINT", "CAPABILITIES", "NAME"), rows)


def cmd_route(settings: SwarmSettings, args: argparse.Namespace) -> int:
    body = {"capability": args.capability, "prefer_local": not args.prefer_cloud}
    decision = call_router(settings, "POST", "/route", json=body)
    if args.json:
        emit(decision)
    else:
        fallbacks = ", ".join(f"{f['agent_id'] or f['provider']}" for f in decision["fallbacks"])
        rows = [(key, decision[key]) for key in ("provider", "model", "endpoint", "agent_id")]
        rows += [("cost_per_1k_tokens", decision["cost_per_1k_tokens"])]
        rows += [("fallbacks", fallbacks or "-"), ("reason", decision["reason"])]
        table(None, rows)
    return 0


def cmd_chat(settings: SwarmSettings, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {
        "model": f"capability:{args.capability}",
        "messages": [{"role": "user", "content": args.prompt}],
        "stream": args.stream,
    }
    if args.max_tokens:
        body["max_tokens"] = args.max_tokens
    path = "/v1/chat/completions"
    if not args.stream:
        answer = call_router(settings, "POST", path, json=body)
        if args.json:
            emit(answer)
        else:
            print(answer["choices"][0]["message"]["content"])
        return 0
    for event in stream_events(settings.router_urls, path, body):
        if args.json:
            print(json.dumps(event), flush=True)
        elif event.get("choices"):
            print(event["choices"][0].get("delta", {}).get("content") or "", end="", flush=True)
    if not args.json:
        print()
    return 0


def stream_events(routers: list[str], path: str, body: dict) -> Iterable[dict]:
    """The SSE events of a streamed chat from the first router that answers (as
    :func:`call_router`), until ``[DONE]``; an error event is an error."""
    with contextlib.ExitStack() as opened:

        def open_stream(url: str) -> httpx.Response:
            return opened.enter_context(httpx.stream("POST", url, json=body, timeout=TIMEOUT))

        urls = [f"{router}{path}" for router in routers]
        response = first_connected(urls, "router", open_stream)
        try:
            yield from _events(response)
        except httpx.HTTPError as exc:
            raise CommandFailed(unreachable("router", str(response.url), exc)) from None


def _events(response: httpx.Response) -> Iterable[dict]:
    if response.status_code != 200:
        response.read()
        raise CommandFailed(describe(response, "router"))
    for line in response.iter_lines():
        data = line.removeprefix("data: ")
        if not line.startswith("data: ") or data == "[DONE]":
            continue
        event = json.loads(data)
        if "error" in event:
            raise CommandFailed(f"router: {event['error'].get('message')}")
        yield event


def cmd_classify(settings: SwarmSettings, args: argparse.Namespace) -> int:
    """Through the registry, as any client would: the agent serving domain classification."""
    agents = discover(settings, {"capabilities": ["domain_classification"]})
    if not agents:
        raise CommandFailed("no healthy agent serves domain_classification (swarm status?)")
    classifier = agents[0]
    url = f"{classifier['endpoint']}/classify_domain"
    answer = call("POST", url, classifier["agent_id"], json={"query": args.query, "top_k": 3})
    if args.json:
        emit(answer)
    else:
        rows = [(d["domain"], f"{d['confidence']:.3f}") for d in answer["domains"]]
        table(("DOMAIN", "CONFIDENCE"), rows)
    return 0


def cmd_costs(settings: SwarmSettings, args: argparse.Namespace) -> int:
    summary = call_router(settings, "GET", "/api/usage/summary", params={"window": args.window})
    if args.json:
        emit(summary)
        return 0
    share = summary["local_share"]
    rows = [
        ("window", args.window),
        ("calls", f"{summary['calls']:,} ({summary['errors']:,} errors)"),
        ("served locally", "-" if share is None else f"{share:.1%}"),
        ("tokens local", f"{summary['local_tokens']:,}"),
        ("tokens cloud", f"{summary['cloud_tokens']:,}"),
        ("cost", f"${summary['cost']:.4f}"),
        ("would have cost", f"${summary['would_have_cost']:.4f} at the reference price"),
        ("saved", f"${summary['saved']:.4f}"),
        ("routed requests", f"{summary['routed']:,}"),
        ("fallbacks", f"{summary['fallbacks']:,}"),
    ]
    table(None, rows)
    return 0


# --- plumbing ------------------------------------------------------------------------------


def call(method: str, url: str, who: str, **kwargs: Any) -> Any:
    """One request; an unreachable daemon or an error answer becomes one line."""
    return call_first(method, [url], who, **kwargs)


def call_router(settings: SwarmSettings, method: str, path: str, **kwargs: Any) -> Any:
    """One request to the routers (``router.urls``), as :func:`call_first`."""
    urls = [f"{router}{path}" for router in settings.router_urls]
    return call_first(method, urls, "router", **kwargs)


def call_registry(settings: SwarmSettings, method: str, path: str, **kwargs: Any) -> Any:
    """One request to the registries (``registry.urls``), as :func:`call_first`."""
    urls = [f"{registry}{path}" for registry in settings.registry_urls]
    return call_first(method, urls, "registry", **kwargs)


def discover(settings: SwarmSettings, body: dict) -> list[dict]:
    """The agents the registries discover for ``body``."""
    return call_registry(settings, "POST", "/discover", json=body)["agents"]


def call_first(method: str, urls: list[str], who: str, **kwargs: Any) -> Any:
    """One request to the first of ``urls`` (replicas of ``who``) that takes the
    connection; an error answer, or no replica answering, becomes one line."""
    response = first_connected(
        urls, who, lambda url: httpx.request(method, url, timeout=TIMEOUT, **kwargs)
    )
    return answer(response, who)


def first_connected(urls: list[str], who: str, send: Callable[[str], Sent]) -> Sent:
    """What ``send`` returns for the first of ``urls`` that takes the connection: an HTTP
    answer, even a 5xx, is the answer; a replica that takes no connection, the next one's
    turn. Any other failure (the request may have gone out) is not tried twice."""
    for tried, url in enumerate(urls, 1):
        try:
            return send(url)
        except NOT_ANSWERED as exc:
            if tried == len(urls):
                raise CommandFailed(unreachable(who, url, exc, tried)) from None
        except httpx.HTTPError as exc:
            raise CommandFailed(unreachable(who, url, exc)) from None
    raise AssertionError(f"the {who} URLs are never empty")


def answer(response: httpx.Response, who: str) -> Any:
    if response.status_code >= 400:
        raise CommandFailed(describe(response, who))
    return response.json()


def unreachable(who: str, url: str, exc: Exception, tried: int = 1) -> str:
    also = f" (nor the {tried - 1} before it)" if tried > 1 else ""
    return (
        f"{who} at {url} does not answer ({type(exc).__name__}){also}; is the swarm up? (swarm up)"
    )


def describe(response: httpx.Response, who: str) -> str:
    """The error envelope's message, else the status line."""
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.reason_phrase
    return f"{who}: HTTP {response.status_code}: {message}"


def emit(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def table(headers: Sequence[str] | None, rows: Sequence[Sequence[Any]]) -> None:
    lines = [[str(cell) for cell in row] for row in rows]
    if headers:
        lines.insert(0, list(headers))
    if not lines:
        return
    widths = [max(len(line[n]) for line in lines) for n in range(len(lines[0]))]
    for line in lines:
        cells = (cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        print("  ".join(cells).rstrip())


COMMANDS: dict[str, Callable[[SwarmSettings, argparse.Namespace], int]] = {
    "up": cmd_up,
    "down": cmd_down,
    "status": cmd_status,
    "wait": cmd_wait,
    "config": cmd_config,
    "agents": cmd_agents,
    "discover": cmd_discover,
    "route": cmd_route,
    "chat": cmd_chat,
    "classify": cmd_classify,
    "costs": cmd_costs,
}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="swarm", description="Run the local LLM swarm and talk to it."
    )
    top.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up = sub.add_parser("up", help="start every daemon under supervisord; wait until healthy")
    up.add_argument("--timeout", type=float, default=180.0, help="seconds (default 180)")
    down = sub.add_parser("down", help="stop every daemon (wrappers deregister) and supervisord")
    status = sub.add_parser("status", help="each daemon's process state and health")
    wait = sub.add_parser("wait", help="wait until every daemon is healthy")
    wait.add_argument("--timeout", type=float, default=180.0)
    config = sub.add_parser("config", help="write supervisord's config; print its path")
    for command in (up, down, status, wait, config):  # this host's part of a fleet
        command.add_argument(
            "--role",
            choices=ROLES,
            default="all",
            help="control: the registry and router; node: the model hosts and wrappers at "
            "this host's address; all (default): every daemon",
        )
        command.add_argument(
            "--host",
            help="this host's address in the profile: a node runs the daemons there (default: "
            "any address of this machine); control binds its registry and router to it",
        )
    agents = sub.add_parser("agents", help="the agents in the registry")
    agents.add_argument("--capability", help="only those with this capability")
    agents.add_argument("--limit", type=int, default=100)
    discover = sub.add_parser("discover", help="healthy agents with a capability")
    discover.add_argument("capability")
    discover.add_argument("--all", action="store_true", help="unhealthy ones too")
    route = sub.add_parser("route", help="where the router would send a capability")
    route.add_argument("capability")
    route.add_argument("--prefer-cloud", action="store_true", help="do not prefer local")
    chat = sub.add_parser("chat", help="chat through the router")
    chat.add_argument("prompt")
    chat.add_argument("--capability", default="reasoning")
    chat.add_argument("--stream", action="store_true")
    chat.add_argument("--max-tokens", type=int)
    classify = sub.add_parser("classify", help="the TLC domain of a query")
    classify.add_argument("query")
    costs = sub.add_parser("costs", help="the dashboard's summary: tokens, cost, savings")
    costs.add_argument("--window", default="24h", help='"15m", "24h", "7d" (default 24h)')
    for command in sub.choices.values():  # --json also after the command
        command.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = load_settings()
        return COMMANDS[args.command](settings, args)
    except ConfigError as exc:
        print(f"swarm: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (CommandFailed, swarm.SwarmError) as exc:
        print(f"swarm: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
