"""The HTTP layer under the official ``ollama.AsyncClient``, on aiohttp.

``ollama.AsyncClient`` sends every call through one object, ``_client``: ``request()``
for whole answers and ``stream()`` for NDJSON, answers with ``raise_for_status()``,
``json()``, ``text`` and ``aiter_lines()``, and httpx's error types. This is that object
on an aiohttp connection pool. It is the wrapper's hot path: httpx's request and
response machinery (URL merging, cookie jar, auth and hook flows) cost more CPU per call
than everything else the wrapper does, and DESIGN 7 gives the hop a 1 ms budget.
The contract tests in ``tests/test_wrapper_ollama.py`` run the official client over it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import aiohttp
import httpx
import ollama

from services.common.context import REQUEST_ID_HEADER, current_request_id


def ollama_client(url: str, *, connect_timeout: float, read_timeout: float) -> ollama.AsyncClient:
    """The official client, with its base URL and headers, over :class:`AiohttpClient`."""
    client = ollama.AsyncClient(url)
    made = client._client  # httpx's, built by ollama from the host: keep what it worked out
    client._client = AiohttpClient(
        str(made.base_url),
        headers={"content-type": "application/json", "user-agent": made.headers["user-agent"]},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    )
    return client


class AiohttpClient:
    """The part of ``httpx.AsyncClient`` that ``ollama.AsyncClient`` uses."""

    def __init__(
        self,
        base_url: str,
        *,
        headers: Mapping[str, str],
        connect_timeout: float,
        read_timeout: float,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = dict(headers)
        # Reads wait as long as a generation may take between two chunks; connects do not.
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self._session: aiohttp.ClientSession | None = None

    async def request(self, method: str, url: str, *, json: Any = None) -> Response:
        with _as_httpx_errors():
            answer = await self._send(method, url, json)
            async with answer:
                return Response(answer.status, await answer.read(), headers=answer.headers)

    @contextlib.asynccontextmanager
    async def stream(self, method: str, url: str, *, json: Any = None) -> AsyncIterator[Response]:
        with _as_httpx_errors():
            answer = await self._send(method, url, json)
        try:
            yield Response(answer.status, None, answer, headers=answer.headers)
        finally:
            # A stream left before its end drops the connection: the backend sees the
            # client gone and stops generating. A finished one goes back to the pool.
            if answer.content.at_eof():
                answer.release()
            else:
                answer.close()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _send(self, method: str, url: str, body: Any) -> aiohttp.ClientResponse:
        if self._session is None:  # made in the running loop, on first use
            self._session = aiohttp.ClientSession(headers=self.headers, timeout=self._timeout)
        headers = None
        if request_id := current_request_id():
            headers = {REQUEST_ID_HEADER: request_id}
        data = None if body is None else json.dumps(body).encode()
        target = url if url.startswith(("http://", "https://")) else self.base_url + url
        return await self._session.request(method, target, data=data, headers=headers)


class Response:
    """An answer as ``ollama.AsyncClient`` reads it: whole (``content``) or streamed."""

    def __init__(
        self,
        status_code: int,
        content: bytes | None,
        stream: aiohttp.ClientResponse | None = None,
        *,
        headers: Mapping[str, str],
    ) -> None:
        self.status_code = status_code
        self.content = content
        self._stream = stream
        self.headers = headers  # read for a busy backend's Retry-After

    @property
    def text(self) -> str:
        return (self.content or b"").decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.content or b"")

    def raise_for_status(self) -> None:
        if self.status_code >= 400:
            message = f"the model backend answered {self.status_code}"
            raise httpx.HTTPStatusError(message, request=None, response=self)  # type: ignore[arg-type]

    async def aread(self) -> bytes:
        if self.content is None and self._stream is not None:
            with _as_httpx_errors():
                self.content = await self._stream.read()
        return self.content or b""

    async def aiter_lines(self) -> AsyncIterator[str]:
        """NDJSON lines as they arrive, whatever their length (aiohttp's own line reader
        stops at 64 KiB, and a final ``generate`` chunk can carry a longer ``context``)."""
        assert self._stream is not None
        pending = b""
        with _as_httpx_errors():
            async for chunk in self._stream.content.iter_any():
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    if line.strip():
                        yield line.decode()
        if pending.strip():
            yield pending.decode()


@contextlib.contextmanager
def _as_httpx_errors() -> Iterator[None]:
    """aiohttp's failures as the httpx errors that ollama and the wrapper expect."""
    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:
        raise httpx.ConnectTimeout(str(exc) or "connect timed out") from exc
    except aiohttp.ClientConnectorError as exc:
        raise httpx.ConnectError(str(exc)) from exc
    except (aiohttp.SocketTimeoutError, TimeoutError) as exc:
        raise httpx.ReadTimeout(str(exc) or "read timed out") from exc
    except aiohttp.ClientError as exc:
        raise httpx.RemoteProtocolError(f"{type(exc).__name__}: {exc}") from exc
