"""Anthropic's Messages API as an OpenAI chat: requests one way, answers and streams back.

Tools go both ways: OpenAI ``tools`` are Anthropic tools (``input_schema`` the function's
parameters), ``tool_choice`` auto / none / required / a named function is Anthropic's
``auto`` / ``none`` / ``any`` / ``tool``, ``parallel_tool_calls: false`` is
``disable_parallel_tool_use``; an assistant's ``tool_calls`` are ``tool_use`` blocks (the
arguments' JSON text parsed to ``input``) and ``role: "tool"`` messages are ``tool_result``
blocks of a user turn, consecutive turns of one role merged (Anthropic wants them in one).
Back, ``tool_use`` blocks are ``tool_calls`` (the id kept, ``input`` as JSON text), streamed
as OpenAI streams them: the id and name in a call's first delta, argument pieces after.

JSON output (``response_format`` json_object / json_schema) is a forced tool: Anthropic's
own JSON output (``output_config.format``) is only served by its newest models, and a
provider's configured model may be an older one, while a tool whose ``input_schema`` is the
schema is served by every model with tool use, and the model's input is always a JSON
object. The request gets one more tool, ``JSON_TOOL``, forced (or, beside the caller's
tools under ``auto``, any tool: answering is then calling it), and its input comes back as
the message content, JSON text, with finish_reason ``stop`` (text beside it is dropped:
the content must parse). An object is what OpenAI's JSON modes answer too (a json_schema's
root must be an object there as well).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from schemas import openai
from schemas.errors import ErrorDetail, ErrorEnvelope
from services.common.context import current_request_id
from services.common.errors import BadRequest
from services.common.streaming import SSE_DONE, sse

DEFAULT_MAX_TOKENS = 1_024  # Anthropic requires one; OpenAI callers may omit it
JSON_TOOL = "json_answer"
FINISH_REASONS: dict[str, openai.FinishReason] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


class Malformed(ValueError):
    """An Anthropic answer this module cannot read."""


# --- the request ---------------------------------------------------------------------------


def anthropic_request(body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI chat request (already validated by the route) as an Anthropic Messages
    request. A tool call whose arguments are not a JSON object is the caller's 400."""
    system = [
        _text(m.get("content")) for m in body["messages"] if m["role"] in ("system", "developer")
    ]
    request: dict[str, Any] = {
        "model": body["model"],
        "messages": _turns(body["messages"]),
        "max_tokens": body.get("max_completion_tokens")
        or body.get("max_tokens")
        or DEFAULT_MAX_TOKENS,
    }
    if system:
        request["system"] = "\n\n".join(system)
    for name in ("temperature", "top_p", "stream"):
        if body.get(name) is not None:
            request[name] = body[name]
    stop = body.get("stop")
    if stop:
        request["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    tools = [_tool(t["function"]) for t in body.get("tools") or []]
    choice = _tool_choice(body.get("tool_choice"), bool(tools))
    json_kind = (body.get("response_format") or {}).get("type")
    chosen = choice["type"] if choice else "auto"  # OpenAI's default
    # Under required or a named function the answer is a call anyway: no JSON tool.
    if json_kind in ("json_object", "json_schema") and chosen in ("auto", "none"):
        may_call = bool(tools) and chosen == "auto"
        tools.append(_json_tool(body["response_format"]))
        # Beside the caller's tools, any tool: the model calls one of them or answers;
        # else the JSON tool, once (one answer).
        choice = {"type": "any"} if may_call else _forced(JSON_TOOL)
    if tools:
        request["tools"] = tools
        if body.get("parallel_tool_calls") is False and chosen != "none":
            choice = (choice or {"type": "auto"}) | {"disable_parallel_tool_use": True}
    if choice is not None:
        request["tool_choice"] = choice
    return request


def answers_in_json(request: dict[str, Any]) -> bool:
    """Whether an Anthropic request (``anthropic_request``) offers ``JSON_TOOL``: a call
    of it is then the answer's JSON content."""
    return any(tool["name"] == JSON_TOOL for tool in request.get("tools", ()))


def _turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The user, assistant and tool messages as Anthropic turns; a turn of the role of the
    one before joins it (tool results, then the user's text, are one user turn)."""
    turns: list[dict[str, Any]] = []
    for message in messages:
        role = message["role"]
        if role == "tool":
            content: str | list[dict[str, Any]] = [_tool_result(message)]
            role = "user"
        elif role == "assistant" and message.get("tool_calls"):
            text = _text(message.get("content"))
            content = [{"type": "text", "text": text}] if text else []
            content += [_tool_use(call) for call in message["tool_calls"]]
        elif role in ("user", "assistant"):
            content = _text(message.get("content"))
        else:
            continue  # system and developer: Anthropic's top-level system
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] = _blocks(turns[-1]["content"]) + _blocks(content)
        else:
            turns.append({"role": role, "content": content})
    return turns


def _blocks(content: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    return content


def _tool_use(call: dict[str, Any]) -> dict[str, Any]:
    function = call["function"]
    try:
        arguments = json.loads(function["arguments"] or "{}")
    except ValueError:
        arguments = None
    if not isinstance(arguments, dict):
        raise BadRequest(
            f"the arguments of tool call {call['id']!r} are not a JSON object",
            code="invalid_tool_arguments",
        )
    return {"type": "tool_use", "id": call["id"], "name": function["name"], "input": arguments}


def _tool_result(message: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "tool_result",
        "tool_use_id": message.get("tool_call_id") or "",
        "content": _text(message.get("content")),
    }


def _tool(function: dict[str, Any]) -> dict[str, Any]:
    tool: dict[str, Any] = {"name": function["name"]}
    if function.get("description"):
        tool["description"] = function["description"]
    # Anthropic requires a schema; OpenAI lets a function without parameters take none.
    tool["input_schema"] = function.get("parameters") or {"type": "object", "properties": {}}
    return tool


def _tool_choice(choice: Any, has_tools: bool) -> dict[str, Any] | None:
    """OpenAI's ``tool_choice`` as Anthropic's; None when not given or without tools (as
    OpenAI, Anthropic refuses a choice among no tools)."""
    if choice is None or not has_tools:
        return None
    if isinstance(choice, dict):
        return {"type": "tool", "name": choice["function"]["name"]}
    return {"type": {"auto": "auto", "none": "none", "required": "any"}[choice]}


def _forced(name: str) -> dict[str, Any]:
    return {"type": "tool", "name": name, "disable_parallel_tool_use": True}


def _json_tool(response_format: dict[str, Any]) -> dict[str, Any]:
    spec = response_format.get("json_schema") or {}
    schema = spec.get("schema") or {"type": "object"}
    about = spec.get("description") or "the answer to the conversation's last request"
    return {
        "name": JSON_TOOL,
        "description": f"Give your answer as this tool's input, a JSON object: {about}.",
        "input_schema": schema,
    }


# --- the answer ----------------------------------------------------------------------------


def openai_completion(message: Any, json_answer: bool) -> openai.ChatCompletion:
    """An Anthropic Messages answer as an OpenAI chat completion; ``json_answer``: the
    request asked for JSON, carried by ``JSON_TOOL``'s input. Raises Malformed."""
    try:
        blocks = message["content"]
        text = "".join(b["text"] for b in blocks if b["type"] == "text")
        calls = [
            openai.ToolCall(
                id=b["id"],
                function=openai.FunctionCall(name=b["name"], arguments=_arguments(b["input"])),
            )
            for b in blocks
            if b["type"] == "tool_use"
        ]
        finish = FINISH_REASONS.get(message.get("stop_reason") or "", "stop")
        usage = message.get("usage") or {}
        usage = openai.Usage.of(usage.get("input_tokens", 0), usage.get("output_tokens", 0))
        if json_answer:
            text, calls, finish = _json_content(calls, finish, text)
        # OpenAI's content is null beside tool calls and without text, "" otherwise.
        content = text if text or not calls else None
        choice = openai.Choice(
            message=openai.AssistantMessage(content=content, tool_calls=calls or None),
            finish_reason=finish,
        )
        return openai.ChatCompletion(
            id="chatcmpl-" + str(message.get("id") or uuid.uuid4().hex),
            created=int(time.time()),
            model=str(message.get("model", "")),
            choices=[choice],
            usage=usage,
        )
    # pydantic's ValidationError is a ValueError
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise Malformed(f"an Anthropic answer out of shape: {type(exc).__name__}: {exc}") from None


def _json_content(
    calls: list[openai.ToolCall], finish: openai.FinishReason, text: str
) -> tuple[str, list[openai.ToolCall], openai.FinishReason]:
    """A JSON answer: ``JSON_TOOL``'s input is the content (text beside it dropped: the
    content must parse); other tool calls stay calls."""
    answers = [c for c in calls if c.function.name == JSON_TOOL]
    calls = [c for c in calls if c.function.name != JSON_TOOL]
    if answers:
        text = answers[0].function.arguments
        if finish == "tool_calls" and not calls:
            finish = "stop"
    return text, calls, finish


def _arguments(tool_input: Any) -> str:
    if not isinstance(tool_input, dict):
        raise Malformed(f"a tool_use input is a {type(tool_input).__name__}, not an object")
    return json.dumps(tool_input, ensure_ascii=False)


def openai_error(status: int, body: bytes) -> ErrorEnvelope:
    """An Anthropic refusal (``{"type": "error", "error": {"type", "message"}}``) in the
    OpenAI envelope the router's other answers use; its error types are OpenAI's words."""
    try:
        error = json.loads(body)["error"]
        kind, message = str(error["type"]), str(error["message"])
    except (KeyError, TypeError, ValueError):
        kind, message = "api_error", f"Anthropic answered HTTP {status}"
    detail = ErrorDetail(message=message, type=kind, request_id=current_request_id())
    return ErrorEnvelope(error=detail)


async def openai_chunks_from_anthropic(
    lines: AsyncIterator[str], model: str, usage: list[int], json_answer: bool
) -> AsyncIterator[bytes]:
    """Anthropic's stream events as OpenAI chunks: text and tool-call deltas, then the
    finish reason and the usage, then ``[DONE]``. Raises Malformed on an event out of
    shape, StreamFailed on an ``error`` event."""
    stream = _Stream(model, json_answer)
    async for line in lines:
        if not line.startswith("data: "):
            continue  # "event: ..." names the type that the data repeats
        try:
            chunk = stream.read(json.loads(line[6:]), usage)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            what = f"{type(exc).__name__}: {exc}"
            raise Malformed(f"an Anthropic event out of shape: {what}") from None
        if chunk:
            yield chunk
    if not stream.stopped:  # cut short: no finish reason to tell
        raise Malformed("an Anthropic stream that ended before its message_stop")
    yield stream.end(usage)


class StreamFailed(Exception):
    """An ``error`` event: the provider failed mid-stream (overloaded, ...)."""


class _Stream:
    """What an Anthropic stream has said so far, read event by event into OpenAI chunks."""

    def __init__(self, model: str, json_answer: bool) -> None:
        self.head = {"id": "chatcmpl-" + uuid.uuid4().hex, "created": int(time.time())}
        self.head["model"] = model
        self.json_answer = json_answer
        self.calls: dict[int, int] = {}  # a tool_use block's index -> its OpenAI call index
        self.answer: int | None = None  # the index of JSON_TOOL's block, in json_answer
        self.said: set[int] = set()  # the tool_use blocks whose input has had a piece
        self.finish: openai.FinishReason = "stop"
        self.stopped = False  # message_stop came

    def read(self, event: dict[str, Any], usage: list[int]) -> bytes | None:
        """The chunk an event makes, if any."""
        kind = event["type"]
        if kind == "message_start":
            usage[0] = event["message"].get("usage", {}).get("input_tokens", 0)
            return self._chunk(openai.ChunkDelta(role="assistant", content=""))
        if kind == "content_block_start" and event["content_block"]["type"] == "tool_use":
            return self._start(event["index"], event["content_block"])
        if kind == "content_block_delta":
            return self._delta(event["index"], event["delta"])
        if kind == "content_block_stop" and event["index"] not in self.said:
            # An empty input streams no piece; OpenAI's arguments are then "{}".
            return self._input(event["index"], "{}")
        if kind == "message_delta":
            usage[1] = event.get("usage", {}).get("output_tokens", usage[1])
            self.finish = FINISH_REASONS.get(event["delta"].get("stop_reason") or "", "stop")
        elif kind == "message_stop":
            self.stopped = True
        elif kind == "error":
            raise StreamFailed(event.get("error", {}).get("message", "the provider failed"))
        return None

    def end(self, usage: list[int]) -> bytes:
        """The last chunks: the finish reason, the usage (OpenAI's include_usage chunk, no
        choices) and ``[DONE]``."""
        finish = self.finish
        if finish == "tool_calls" and not self.calls:
            finish = "stop"  # the JSON answer was the only call
        total = openai.ChatCompletionChunk(**self.head, choices=[], usage=openai.Usage.of(*usage))
        return self._chunk(openai.ChunkDelta(), finish) + sse(total) + SSE_DONE

    def _start(self, block: int, tool_use: dict[str, Any]) -> bytes | None:
        if self.json_answer and tool_use["name"] == JSON_TOOL:
            self.answer = block
            return None
        index = self.calls[block] = len(self.calls)
        function = openai.ChunkFunctionCall(name=tool_use["name"], arguments="")
        call = openai.ChunkToolCall(index=index, id=tool_use["id"], type="function")
        call.function = function
        return self._chunk(openai.ChunkDelta(tool_calls=[call]))

    def _delta(self, block: int, delta: dict[str, Any]) -> bytes | None:
        if delta["type"] == "text_delta":
            # Beside a JSON answer, text would make the content unparseable.
            return (
                None if self.json_answer else self._chunk(openai.ChunkDelta(content=delta["text"]))
            )
        if delta["type"] == "input_json_delta" and delta["partial_json"]:
            return self._input(block, delta["partial_json"])
        return None

    def _input(self, block: int, piece: str) -> bytes | None:
        """A piece of a tool_use block's input: the JSON answer's content, or a call's."""
        if block == self.answer:
            self.said.add(block)
            return self._chunk(openai.ChunkDelta(content=piece))
        if block in self.calls:
            self.said.add(block)
            function = openai.ChunkFunctionCall(arguments=piece)
            call = openai.ChunkToolCall(index=self.calls[block], function=function)
            return self._chunk(openai.ChunkDelta(tool_calls=[call]))
        return None  # a text block's stop, a block of a kind not translated

    def _chunk(self, delta: openai.ChunkDelta, finish: openai.FinishReason | None = None) -> bytes:
        choice = openai.ChunkChoice(delta=delta, finish_reason=finish)
        return sse(openai.ChatCompletionChunk(**self.head, choices=[choice]))


def _text(content: Any) -> str:
    """OpenAI content, a string or a list of parts, as plain text."""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content or ""
