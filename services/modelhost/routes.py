"""The Ollama API subset the swarm and the official ``ollama`` client use.

Shapes follow Ollama's ``docs/api.md`` (``schemas.ollama``); errors on ``/api/*`` are
``{"error": "message"}`` through ``services.common.errors``. Where this host differs:

- ``template`` (a Go template) and load-time options (``num_ctx``, ``num_thread``, ...) are
  ignored: the model stays as loaded, and ``keep_alive`` never unloads it;
- a prompt that leaves no room in the context is refused (400) rather than truncated, and
  an answer that fills the context ends with ``done_reason`` "length" (no context shift);
- ``suffix``, images and ``think`` get Ollama's 400 for a model without them, and so do
  generate and chat for an embedding model (all-minilm);
- ``tools`` are served on ``/api/chat`` for every model, with or without tool markup in
  its template: what the host does is in ``services.modelhost.tools``;
- generations are served first come, first served, at most ``max_pending`` admitted at
  once (running and queued): one more gets Ollama's 503 with a ``Retry-After`` from the
  measured service time (``queue``); the queue's figures are in ``/health`` and
  ``/metrics``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from schemas.errors import OllamaError
from schemas.health import HostHealth
from schemas.ollama import (
    ChatRequest,
    ChatResponse,
    GenerateRequest,
    GenerateResponse,
    ListedModel,
    ListResponse,
    Logprob,
    Message,
    ModelDetails,
    ProcessResponse,
    RunningModel,
    ShowRequest,
    ShowResponse,
    VersionResponse,
    keep_alive_seconds,
    timestamp_now,
)
from services.common.errors import BadRequest, NotFound, SwarmError
from services.common.metrics import CLIENT_CLOSED_REQUEST
from services.common.openapi import NDJSON, OLLAMA_STREAMED, errors, streaming
from services.common.strict_json import StrictJSONRoute
from services.common.tool_calls import Call, CallWatch, ToolSpec, parse_calls
from services.modelhost import tools
from services.modelhost.engine import Engine, Job, Outcome, Piece, Sampling, grammar_for
from services.modelhost.queue import Ticket

log = logging.getLogger(__name__)

# The Ollama release whose API this host follows (logprobs arrived in 0.12.11).
OLLAMA_VERSION = "0.12.11"

router = APIRouter(route_class=StrictJSONRoute)


def generation_responses(answer: type[BaseModel]) -> dict[int, Any]:
    """A generation's answers: JSON or NDJSON of ``answer``; 404 for a model this host
    does not serve, 503 when its queue is full."""
    return errors(404, 503) | streaming(NDJSON, answer, OllamaError, description=OLLAMA_STREAMED)


class NDJSONResponse(StreamingResponse):
    """A streamed answer whose body iterator is always closed, even on a disconnect, and
    then ``on_close`` called.

    Closing it is what stops the generation and frees the model; Starlette only cancels
    the task that was iterating it. A body never started (the client left before) holds
    the model all the same: ``on_close`` hands it on.
    """

    media_type = "application/x-ndjson"

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(content)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
            self.on_close()


def _engine(request: Request) -> Engine:
    return request.app.state.engine


def _check_model(engine: Engine, name: str) -> None:
    if name.strip().lower() != engine.model.name:
        raise NotFound(f'model "{name}" not found, try pulling it first')


def _json(answer: BaseModel) -> Response:
    return Response(answer.model_dump_json(exclude_none=True), media_type="application/json")


def _details(engine: Engine) -> ModelDetails:
    model = engine.model
    return ModelDetails(
        format="gguf",
        family=model.family,
        families=[model.family],
        parameter_size=model.parameter_size,
        quantization_level=model.quantization,
    )


def _modified_at(engine: Engine) -> str:
    mtime = datetime.fromtimestamp(engine.path.stat().st_mtime, UTC)
    return mtime.isoformat(timespec="microseconds").replace("+00:00", "Z")


# --- model information ---------------------------------------------------------------------


@router.api_route(
    "/", methods=["GET", "HEAD"], response_class=PlainTextResponse, include_in_schema=False
)
async def root() -> str:
    return "Ollama is running"


@router.get("/health", response_model=HostHealth)
async def health(request: Request) -> HostHealth:
    engine = _engine(request)
    settings = request.app.state.settings
    queue = engine.queue
    service = queue.service_time
    return HostHealth(
        status="healthy",
        service="modelhost",
        port=settings.port,
        uptime_seconds=round(time.monotonic() - request.app.state.started, 3),
        model=engine.model.name,
        model_loaded=True,
        busy=engine.busy,
        load_duration_ms=round(engine.load_duration / 1e6, 1),
        running=queue.running,
        queued=queue.queued,
        parallel=queue.slots,
        max_pending=queue.limit,
        service_time_ms=None if service is None else round(service * 1e3, 1),
        expected_wait_ms=round(queue.expected_wait() * 1e3, 1),
    )


async def readiness(request: Request) -> str | None:
    """Ready once the warm-up decode succeeded (``GET /readyz``); the lifespan loads the
    model and runs it before the server listens, so this holds from the first answer."""
    engine = getattr(request.app.state, "engine", None)
    if engine is None or engine.warmed_up is None:
        return "the model has not completed its warm-up decode"
    return None


@router.get("/api/version", response_model=VersionResponse)
async def version() -> VersionResponse:
    return VersionResponse(version=OLLAMA_VERSION)


@router.get("/api/tags", response_model=ListResponse, response_model_exclude_none=True)
async def tags(request: Request) -> ListResponse:
    engine = _engine(request)
    listed = ListedModel(
        name=engine.model.name,
        model=engine.model.name,
        modified_at=_modified_at(engine),
        size=engine.path.stat().st_size,
        digest=engine.digest,
        details=_details(engine),
    )
    return ListResponse(models=[listed])


@router.get("/api/ps", response_model=ProcessResponse, response_model_exclude_none=True)
async def ps(request: Request) -> ProcessResponse:
    engine = _engine(request)
    # Loaded for the life of the process: Ollama shows keep_alive "forever" as now plus
    # the longest Go duration (about 292 years).
    forever = datetime.now(UTC) + timedelta(microseconds=2**63 // 1000)
    running = RunningModel(
        name=engine.model.name,
        model=engine.model.name,
        size=engine.path.stat().st_size,
        digest=engine.digest,
        details=_details(engine),
        expires_at=forever.isoformat(timespec="microseconds").replace("+00:00", "Z"),
        size_vram=0,
        context_length=engine.n_ctx,
    )
    return ProcessResponse(models=[running])


@router.post(
    "/api/show",
    response_model=ShowResponse,
    response_model_exclude_none=True,
    responses=errors(404),
)
async def show(body: ShowRequest, request: Request) -> ShowResponse:
    engine = _engine(request)
    _check_model(engine, body.model)
    metadata = engine.llama.metadata
    parameters = f"{'num_ctx':<30} {engine.n_ctx}"
    return ShowResponse(
        license=metadata.get("general.license"),
        modelfile=f"# Served by the swarm's embedded model host\nFROM {engine.path}\n"
        f"PARAMETER num_ctx {engine.n_ctx}\n",
        parameters=parameters,
        template=metadata.get("tokenizer.chat_template") or engine.model.chat_format,
        details=_details(engine),
        model_info=engine.model_info(),
        capabilities=list(engine.model.capabilities),
        modified_at=_modified_at(engine),
    )


# --- generation ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Answer:
    """How the pieces and the outcome of one request become Ollama responses."""

    model: str
    chat: bool
    with_context: bool
    arrived: int
    """perf_counter_ns() when the request arrived."""
    tools: Sequence[ToolSpec] = ()
    """The chat's tools: an answer that is all a call of them becomes ``tool_calls``."""

    def partial(self, piece: Piece) -> BaseModel:
        return self._make(piece.text, piece.logprobs, done=False)

    def calls(self, calls: Sequence[Call]) -> BaseModel:
        """The chunk of a streamed answer's calls, sent whole as Ollama does."""
        return self._make("", None, done=False, tool_calls=calls)

    def final(
        self,
        text: str,
        logprobs: list[Logprob] | None,
        outcome: Outcome,
        calls: Sequence[Call] | None = None,
    ) -> BaseModel:
        stats = {
            "done_reason": outcome.done_reason,
            "total_duration": time.perf_counter_ns() - self.arrived,
            # The time until the model was free for this request: templating and
            # tokenizing, then waiting for the generation ahead. Loading happened at start
            # (GET /health reports it), before any request could wait for it.
            "load_duration": outcome.ready_at - self.arrived,
            # As Ollama: the whole prompt, and the part of it read from the cache.
            "prompt_eval_count": outcome.prompt_eval_count,
            "prompt_eval_cached_count": outcome.prompt_eval_cached_count,
            "prompt_eval_duration": outcome.prompt_eval_duration,
            "eval_count": outcome.eval_count,
            "eval_duration": outcome.eval_duration,
        }
        if self.with_context:
            stats["context"] = outcome.tokens
        return self._make(text, logprobs, done=True, tool_calls=calls, **stats)

    def _make(
        self,
        text: str,
        logprobs: list[Logprob] | None,
        tool_calls: Sequence[Call] | None = None,
        **fields: Any,
    ) -> BaseModel:
        common = {"model": self.model, "created_at": timestamp_now(), "logprobs": logprobs}
        if self.chat:
            called = tools.ollama_tool_calls(tool_calls) if tool_calls else None
            message = Message(role="assistant", content=text, tool_calls=called)
            return ChatResponse(**common, message=message, **fields)
        return GenerateResponse(**common, response=text, **fields)


def _line(answer: BaseModel) -> bytes:
    return answer.model_dump_json(exclude_none=True).encode() + b"\n"


def _error_message(exc: Exception) -> str:
    if isinstance(exc, SwarmError):
        return exc.message
    log.error("generation failed", exc_info=exc)
    return f"an error was encountered while running the model: {exc}"


async def _stream(events: AsyncIterator[Piece | Outcome], answer: _Answer) -> AsyncIterator[bytes]:
    watch = CallWatch(answer.tools) if answer.tools else None
    held: list[Logprob] = []  # of the text held back while it may be a call
    async with contextlib.aclosing(events):
        try:
            async for event in events:
                if isinstance(event, Outcome):
                    if watch is not None:
                        text, calls = watch.finish()
                        if calls:
                            yield _line(answer.calls(calls))
                        elif text:
                            yield _line(answer.partial(Piece(text, held or None)))
                    yield _line(answer.final("", None, event))
                elif watch is None:
                    yield _line(answer.partial(event))
                else:
                    held.extend(event.logprobs or ())
                    if text := watch.feed(event.text):
                        yield _line(answer.partial(Piece(text, held or None)))
                        held = []
        except Exception as exc:
            # The status line is long gone: Ollama ends the stream with an error line.
            yield _line(OllamaError(error=_error_message(exc)))


async def _cancel_on_disconnect(request: Request, scope: anyio.CancelScope) -> None:
    # The body is read, so the next message is the disconnect (or never comes).
    while (await request.receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def _turn_unless_gone(request: Request, ticket: Ticket) -> bool:
    """Wait for ``ticket``'s turn; False when the client went away first: the ticket has
    left the queue and nothing ran for it."""
    async with anyio.create_task_group() as group:
        group.start_soon(_cancel_on_disconnect, request, group.cancel_scope)
        await ticket.wait()
        group.cancel_scope.cancel()
        return True
    return False


async def _collect(
    request: Request, events: AsyncIterator[Piece | Outcome], answer: _Answer
) -> Response:
    texts: list[str] = []
    logprobs: list[Logprob] = []
    outcome: Outcome | None = None
    failure: Exception | None = None
    async with anyio.create_task_group() as group:
        # A client that leaves, while queued or served, stops its generation, as with
        # streaming.
        group.start_soon(_cancel_on_disconnect, request, group.cancel_scope)
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    if isinstance(event, Piece):
                        texts.append(event.text)
                        logprobs.extend(event.logprobs or ())
                    else:
                        outcome = event
        except Exception as exc:  # raised after the task group, not wrapped in a group
            failure = exc
        group.cancel_scope.cancel()
    if failure is not None:
        if isinstance(failure, SwarmError):
            raise failure
        raise SwarmError(_error_message(failure)) from failure
    if outcome is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)  # the client is gone
    text = "".join(texts)
    calls = parse_calls(text, answer.tools) if answer.tools else None
    return _json(answer.final("" if calls else text, logprobs or None, outcome, calls))


async def _respond(
    request: Request, engine: Engine, job: Job, answer: _Answer, stream: bool
) -> Response:
    # Admitted here, in arrival order, before any answer is sent: a full queue is a 503
    # (with Retry-After) for a streamed call too, never a 200 and then an error line.
    ticket = engine.queue.enter()
    events = engine.generate(job, ticket)
    if not stream:
        try:
            return await _collect(request, events, answer)
        finally:
            ticket.leave()  # nothing once the generation handed the model on
    # A stream's status line goes out once the model is its own, as Ollama's does; until
    # then its client may leave the queue like any other.
    try:
        served = await _turn_unless_gone(request, ticket)
    except BaseException:
        ticket.leave()
        raise
    if not served:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return NDJSONResponse(_stream(events, answer), on_close=ticket.leave)


def _job(
    engine: Engine, tokens: list[int], body: GenerateRequest | ChatRequest, stop: list[str]
) -> Job:
    engine.check_fits(tokens)
    grammar = grammar_for(body.format)
    if grammar is not None:
        engine.check_grammar(grammar)
    options = body.options
    return Job(
        tokens=tokens,
        sampling=Sampling.from_options(options),
        num_predict=options.num_predict if options else None,
        stop=[*((options.stop or []) if options else []), *stop],
        grammar=grammar,
        top_logprobs=(body.top_logprobs or 0) if body.logprobs else None,
    )


def _generate_job(engine: Engine, body: GenerateRequest) -> Job:
    assert body.prompt is not None
    stop: list[str] = []
    add_bos = not body.context  # a continued conversation has its BOS already
    if body.raw:
        prompt = body.prompt
    else:
        messages = [{"role": "system", "content": body.system}] if body.system else []
        messages.append({"role": "user", "content": body.prompt})
        prompt, has_bos, stop = engine.render_chat(messages)
        add_bos = add_bos and not has_bos
    tokens = engine.tokenize(prompt, add_bos=add_bos)
    if body.context:
        engine.check_tokens(body.context)
        tokens = [*body.context, *tokens]
    return _job(engine, tokens, body, stop)


def _chat_job(engine: Engine, body: ChatRequest) -> tuple[Job, list[ToolSpec]]:
    specs = tools.checked_tools(engine, body.tools)
    messages, template_tools = tools.prompt_messages(engine, body.messages, specs)
    prompt, has_bos, stop = engine.render_chat(messages, template_tools)
    return _job(engine, engine.tokenize(prompt, add_bos=not has_bos), body, stop), specs


def _refuse_embedding_only(engine: Engine, name: str, what: str) -> None:
    # Ollama's answer for an embedding model (all-minilm) asked to generate or chat.
    if not engine.model.generates:
        raise BadRequest(f'"{name}" does not support {what}')


def _refuse_unsupported(name: str, *, think: Any, images: bool) -> None:
    # Ollama's answers for a model without these capabilities.
    if think:
        raise BadRequest(f'"{name}" does not support thinking')
    if images:
        raise BadRequest(f'"{name}" does not support images')


def _load_reason(keep_alive: Any) -> str:
    # An empty request only loads (or, with keep_alive 0, unloads) the model in Ollama.
    return "unload" if keep_alive_seconds(keep_alive) == 0 else "load"


@router.post(
    "/api/generate",
    response_model=GenerateResponse,
    responses=generation_responses(GenerateResponse),
)
async def generate(body: GenerateRequest, request: Request) -> Response:
    arrived = time.perf_counter_ns()
    engine = _engine(request)
    _check_model(engine, body.model)
    _refuse_embedding_only(engine, body.model, "generate")
    if body.suffix:
        raise BadRequest(f'"{body.model}" does not support insert')
    _refuse_unsupported(body.model, think=body.think, images=bool(body.images))
    if not body.prompt:
        empty = GenerateResponse(
            model=body.model,
            created_at=timestamp_now(),
            done=True,
            done_reason=_load_reason(body.keep_alive),
        )
        return _json(empty)
    job = await anyio.to_thread.run_sync(partial(_generate_job, engine, body))
    answer = _Answer(body.model, chat=False, with_context=not body.raw, arrived=arrived)
    return await _respond(request, engine, job, answer, body.stream)


@router.post(
    "/api/chat",
    response_model=ChatResponse,
    responses=generation_responses(ChatResponse),
)
async def chat(body: ChatRequest, request: Request) -> Response:
    arrived = time.perf_counter_ns()
    engine = _engine(request)
    _check_model(engine, body.model)
    _refuse_embedding_only(engine, body.model, "chat")
    _refuse_unsupported(body.model, think=body.think, images=any(m.images for m in body.messages))
    if not body.messages:
        empty = ChatResponse(
            model=body.model,
            created_at=timestamp_now(),
            message=Message(role="assistant", content=""),
            done=True,
            done_reason=_load_reason(body.keep_alive),
        )
        return _json(empty)
    job, specs = await anyio.to_thread.run_sync(partial(_chat_job, engine, body))
    answer = _Answer(body.model, chat=True, with_context=False, arrived=arrived, tools=specs)
    return await _respond(request, engine, job, answer, body.stream)
