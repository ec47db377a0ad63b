"""The upstream call: one interface for whatever serves a candidate, as httpx gives its
transports one.

An upstream sends a chat (or, to an agent, an embeddings) body to a candidate and returns
its :class:`Answer`, or raises
:class:`~router.errors.UpstreamFailed` when the candidate could not serve it (the next one
may); a stream's chunks raise it too when the upstream fails after its first byte. How the
router reacts to each failure is in ``router.errors``. Two kinds serve: registry agents
through the one aiohttp pool (:class:`LocalAgents`: DESIGN 7, httpx's async client is slow
under concurrency) and keyed cloud providers (``router.cloud``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import aiohttp

from router.candidates import Candidate
from router.errors import UpstreamFailed, failed_answer
from services.common.context import REQUEST_ID_HEADER, current_request_id

CHAT_PATH = "/v1/chat/completions"
EMBEDDINGS_PATH = "/v1/embeddings"


@dataclass
class Answer:
    """An upstream's answer: whole (``rest`` None), or a stream's first chunk and the rest."""

    status: int
    media_type: str
    first: bytes
    rest: AsyncIterator[bytes] | None = None
    release: Callable[[], Awaitable[None]] | None = None  # the connection, once streamed
    usage: list[int] | None = None  # a cloud call's [prompt, completion] tokens


class Upstream(Protocol):
    async def send(
        self, candidate: Candidate, body: bytes, stream: bool, path: str = CHAT_PATH
    ) -> Answer:
        """The candidate's answer to an OpenAI body for ``path`` (chat, or embeddings);
        raises UpstreamFailed."""
        ...


class ChatUpstream(Protocol):
    async def send(self, candidate: Candidate, body: bytes, stream: bool) -> Answer:
        """The candidate's answer to an OpenAI chat body; raises UpstreamFailed."""
        ...


class Upstreams:
    """Registry agents and cloud providers behind one ``send``, chosen by the candidate."""

    def __init__(self, agents: Upstream, cloud: ChatUpstream | None) -> None:
        self.agents = agents
        self.cloud = cloud  # None when no provider is keyed

    async def send(
        self, candidate: Candidate, body: bytes, stream: bool, path: str = CHAT_PATH
    ) -> Answer:
        if candidate.is_agent:  # also an agent of locality "cloud": a wrapper, at its endpoint
            return await self.agents.send(candidate, body, stream, path)
        # Cloud providers serve chat only (router.forward never offers them another call).
        assert self.cloud is not None
        assert path == CHAT_PATH
        return await self.cloud.send(candidate, body, stream)


class LocalAgents:
    """Registry agents, through the aiohttp pool: the body goes as it came, to the same
    path on the agent."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def send(
        self, candidate: Candidate, body: bytes, stream: bool, path: str = CHAT_PATH
    ) -> Answer:
        headers = {"Content-Type": "application/json"}
        if request_id := current_request_id():
            headers[REQUEST_ID_HEADER] = request_id
        try:
            answer = await self.session.post(candidate.endpoint + path, data=body, headers=headers)
            failure = failed_answer(answer.status, answer.headers.get("Retry-After"))
            if failure is not None:
                answer.release()
                raise failure
            media = answer.headers.get("Content-Type", "application/json")
            if not stream or answer.status != 200:  # a refusal is the caller's to read, whole
                return Answer(answer.status, media, await answer.read())
            first = await answer.content.readany()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamFailed(describe(exc), kind=_kind(exc)) from None

        async def rest() -> AsyncIterator[bytes]:
            try:
                while chunk := await answer.content.readany():
                    yield chunk
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise UpstreamFailed(describe(exc), kind=_kind(exc)) from None

        async def release() -> None:
            # Back to the pool once read to the end (aiohttp closes one left half-read):
            # closing every streamed connection cost a new connection per stream.
            answer.release()

        return Answer(answer.status, media, first, rest(), release=release)


def describe(exc: BaseException) -> str:
    """An exception as a failure's reason, for the caller's error and the logs."""
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _kind(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect"
    return "broken"
