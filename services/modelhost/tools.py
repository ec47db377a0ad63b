"""Tools on the host's ``/api/chat``. Ollama's API has no ``tool_choice``: every call with
``tools`` is "auto", the model answers or calls.

What the host does, as Ollama does for a model whose template has tools:

- the tools are checked before the call is queued: 400 naming the problem for parameters
  that are not a JSON schema object, a duplicate name, a schema over the size bound, or
  one llama.cpp's grammar builder cannot take (``services.common.tool_calls``);
- a model whose chat template renders ``tools`` (its Jinja mentions them) gets them, and
  the history's calls and results, in the template's own shape. Any other model gets a
  system message that describes each tool (name, description, JSON schema of its
  arguments) and the exact JSON form of a call, ``{"name": ..., "arguments": {...}}``; calls
  in the history are shown to it in that form, and tool results as user turns;
- the answer is ``message.tool_calls`` (content "") when all of it is a JSON call, or a
  list of calls, naming given tools with arguments that validate against their schemas;
  anything else is plain content. Streamed, text that starts (after whitespace) with ``{``
  or ``[`` is held back to the end, then sent as one chunk of calls, or as text, before the
  done chunk, as Ollama streams a call; ``done_reason`` stays "stop" (or "length");
- ``format`` constrains the answer as usual: a wrapper forcing a call (OpenAI's
  ``tool_choice`` "required" or a named function) sends the JSON schema of a call as the
  format, and the answer, a call by construction, comes back as ``tool_calls``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

from schemas.ollama import Message, ToolCall, ToolCallFunction
from services.common.errors import BadRequest
from services.common.tool_calls import (
    Call,
    ToolSpec,
    call_schema,
    calls_text,
    tool_specs,
    tools_prompt,
)
from services.modelhost.engine import Engine, grammar_for


def template_renders_tools(engine: Engine) -> bool:
    """Whether the model's own (Jinja) chat template renders ``tools``."""
    if engine.model.chat_format is not None:
        return False
    return "tools" in (engine.llama.metadata.get("tokenizer.chat_template") or "")


def checked_tools(engine: Engine, tools: Sequence[Any] | None) -> list[ToolSpec]:
    """The request's tools, checked; a call of any of them must make a grammar llama.cpp
    loads (one grammar for all: each load costs about 7 ms; per tool only to name the one
    that fails)."""
    specs = tool_specs(tools)
    if not specs:
        return specs
    try:
        _check_grammar(engine, call_schema(specs))
    except BadRequest:
        for index, spec in enumerate(specs):
            try:
                _check_grammar(engine, call_schema([spec]))
            except BadRequest as exc:
                raise BadRequest(
                    f"the parameters of tool {spec.name!r} cannot be made a grammar: {exc.message}",
                    param=f"tools.{index}.function.parameters",
                ) from None
        raise
    return specs


def _check_grammar(engine: Engine, schema: dict[str, Any]) -> None:
    _grammar_loads(engine, json.dumps(schema))


@functools.lru_cache(maxsize=256)
def _grammar_loads(engine: Engine, schema_json: str) -> None:
    """Raise BadRequest unless llama.cpp loads the grammar of ``schema_json`` (a success is
    cached: a client sends the same tools every call)."""
    grammar = grammar_for(json.loads(schema_json))
    assert grammar is not None
    engine.check_grammar(grammar)


def prompt_messages(
    engine: Engine, messages: Sequence[Message], specs: Sequence[ToolSpec]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages (and tools, for a template that renders them) to render the prompt from."""
    if template_renders_tools(engine):
        tools = [_template_tool(spec) for spec in specs] or None
        return [_template_message(message) for message in messages], tools
    rendered = [_plain_message(message) for message in messages]
    if specs:
        if rendered and rendered[0]["role"] == "system":
            system = f"{rendered[0]['content']}\n\n{tools_prompt(specs)}"
            rendered[0] = {"role": "system", "content": system}
        else:
            rendered.insert(0, {"role": "system", "content": tools_prompt(specs)})
    return rendered, None


def _template_tool(spec: ToolSpec) -> dict[str, Any]:
    function = {"name": spec.name, "parameters": spec.arguments_schema}
    if spec.description:
        function["description"] = spec.description
    return {"type": "function", "function": function}


def _template_message(message: Message) -> dict[str, Any]:
    data: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        data["tool_calls"] = [
            {
                "type": "function",
                "function": {"name": call.function.name, "arguments": call.function.arguments},
            }
            for call in message.tool_calls
        ]
    if message.role == "tool" and message.tool_name:
        data["name"] = message.tool_name
    return data


def _plain_message(message: Message) -> dict[str, Any]:
    if message.role == "tool":
        # Templates without tools often know no "tool" role: a result is a user turn.
        name = message.tool_name or "the tool"
        return {"role": "user", "content": f"Result of {name}: {message.content}"}
    if not message.tool_calls:
        return {"role": message.role, "content": message.content}
    shown = calls_text([Call(c.function.name, c.function.arguments) for c in message.tool_calls])
    content = f"{message.content}\n{shown}" if message.content else shown
    return {"role": message.role, "content": content}


def ollama_tool_calls(calls: Sequence[Call]) -> list[ToolCall]:
    """Calls in Ollama's shape: arguments an object, each with its ``index``."""
    return [
        ToolCall(function=ToolCallFunction(name=call.name, arguments=call.arguments, index=i))
        for i, call in enumerate(calls)
    ]
