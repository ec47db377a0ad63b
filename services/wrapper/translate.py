"""OpenAI chat completions <-> Ollama API, as pure functions (no I/O, no clock, no randomness).

Requests go OpenAI -> Ollama ``/api/chat`` (and, for models without a chat template, on to
a raw ``/api/generate`` prompt); answers come back Ollama -> OpenAI. Token counts come from
Ollama's ``prompt_eval_count``/``eval_count``; when Ollama omits them (a cached prompt, a
backend that does not count) they are counted or estimated here (see ``estimate_tokens``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from schemas import ollama, openai
from services.common.errors import BadRequest
from services.common.tool_calls import (
    Call,
    call_schema,
    calls_text,
    forced_tool,
    tool_specs,
    tools_prompt,
)

# OpenAI's rule of thumb for English text; used only when the backend gives no count.
CHARS_PER_TOKEN = 4


def estimate_tokens(text: str) -> int:
    """About one token per 4 characters, rounded up: at least 1 for any non-empty text."""
    return -(-len(text) // CHARS_PER_TOKEN)


# --- completion-style prompts (models without a chat template) ------------------------------


class CompletionTemplate(BaseModel):
    """How a conversation becomes one plain prompt; ``prompts.completion`` in the profile.

    Each role's template holds ``{content}`` once. The prompt ends with ``generation`` and
    no trailing space (base models such as gemma-3-270m expect that); ``stop`` ends the
    answer where the model would start the next turn by itself.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    system: str = "{content}\n\n"
    user: str = "User: {content}\n"
    assistant: str = "Assistant: {content}\n"
    tool: str = "Tool result: {content}\n"
    generation: str = "Assistant:"
    stop: list[str] = Field(default_factory=lambda: ["\nUser:"])

    @field_validator("system", "user", "assistant", "tool")
    @classmethod
    def _one_content(cls, value: str) -> str:
        if value.count("{content}") != 1:
            raise ValueError("a role template must contain {content} exactly once")
        return value

    @classmethod
    def from_prompts(cls, prompts: dict[str, Any]) -> CompletionTemplate:
        return cls.model_validate(prompts.get("completion") or {})


def render_completion_prompt(
    messages: Iterable[ollama.Message], template: CompletionTemplate
) -> str:
    """The one place a conversation is turned into a completion prompt."""
    turns = [getattr(template, m.role).replace("{content}", _turn_text(m)) for m in messages]
    return "".join(turns) + template.generation if turns else ""


def _turn_text(message: ollama.Message) -> str:
    """A turn's text; calls in the history in the JSON form a model without markup calls in."""
    if not message.tool_calls:
        return message.content
    calls = [Call(c.function.name, c.function.arguments) for c in message.tool_calls]
    return f"{message.content}\n{calls_text(calls)}" if message.content else calls_text(calls)


def completion_request(
    request: ollama.ChatRequest, template: CompletionTemplate
) -> ollama.GenerateRequest:
    """A chat request for a model without a chat template: a raw ``/api/generate`` call;
    its tools described in a first system turn (``tool_calls.tools_prompt``)."""
    options = request.options or ollama.Options()
    stop = [*(options.stop or []), *template.stop]
    messages = request.messages
    if request.tools:
        described = tools_prompt(tool_specs(request.tools))
        messages = [ollama.Message(role="system", content=described), *messages]
    return ollama.GenerateRequest(
        model=request.model,
        prompt=render_completion_prompt(messages, template),
        raw=True,
        stream=request.stream,
        format=request.format,
        options=options.model_copy(update={"stop": stop or None}),
        keep_alive=request.keep_alive,
        logprobs=request.logprobs,
        top_logprobs=request.top_logprobs,
    )


# What generate and chat answers share (timings, counts, logprobs).
_ANSWER_FIELDS = tuple(name for name in ollama.ChatResponse.model_fields if name != "message")


def chat_answer(answer: ollama.GenerateResponse) -> ollama.ChatResponse:
    """A ``/api/generate`` answer (or chunk) in ``/api/chat`` shape; already validated."""
    fields = {name: getattr(answer, name) for name in _ANSWER_FIELDS}
    message = ollama.Message.model_construct(
        role="assistant", content=answer.response, thinking=answer.thinking
    )
    return ollama.ChatResponse.model_construct(message=message, **fields)


def prompt_text(request: ollama.ChatRequest | ollama.GenerateRequest) -> str:
    """The text a request sends to the model, for estimates."""
    if isinstance(request, ollama.GenerateRequest):
        return (request.system or "") + (request.prompt or "")
    return "\n".join(message.content for message in request.messages)


# --- OpenAI request -> Ollama request -------------------------------------------------------


def ollama_chat_request(
    body: openai.ChatCompletionRequest, model: str, max_tokens: int | None = None
) -> ollama.ChatRequest:
    """An OpenAI chat completion request as the Ollama ``/api/chat`` request it means;
    ``max_tokens`` bounds the answer when the request does not.

    A forced call (``tool_choice`` "required" or a named function) is the Ollama ``format``
    of a call's JSON schema, sent with the tools: the backend's grammar makes the answer a
    call (see ``services.common.tool_calls``)."""
    forced = forced_tools(body)
    tools = None
    if body.tools and body.tool_choice != "none":
        tools = [
            ollama.Tool(
                function=ollama.ToolFunction(
                    name=tool.function.name,
                    description=tool.function.description,
                    parameters=tool.function.parameters,
                )
            )
            for tool in body.tools
        ]
    return ollama.ChatRequest(
        model=model,
        messages=ollama_messages(body.messages),
        stream=body.stream,
        format=call_schema(forced) if forced else ollama_format(body.response_format),
        options=ollama_options(body, max_tokens),
        tools=tools,
        logprobs=body.logprobs,
        top_logprobs=body.top_logprobs,
    )


def forced_tools(body: openai.ChatCompletionRequest) -> list[Any] | None:
    """The tools checked (400 naming the problem), and those a call must be one of when
    ``tool_choice`` forces one."""
    return forced_tool(body.tool_choice, tool_specs(body.tools))


def ollama_calls(calls: list[Call]) -> list[ollama.ToolCall]:
    """Calls read from an answer's text in Ollama's shape (arguments an object, indexed)."""
    return [
        ollama.ToolCall(
            function=ollama.ToolCallFunction(name=call.name, arguments=call.arguments, index=i)
        )
        for i, call in enumerate(calls)
    ]


def ollama_messages(messages: list[openai.ChatMessage]) -> list[ollama.Message]:
    tool_names: dict[str, str] = {}
    converted = []
    for index, message in enumerate(messages):
        text, images = _split_content(message.content, index)
        tool_calls = None
        if message.tool_calls:
            tool_calls = [_ollama_tool_call(call, index) for call in message.tool_calls]
            tool_names |= {call.id: call.function.name for call in message.tool_calls}
        converted.append(
            ollama.Message(
                # Ollama has no "developer" role; OpenAI defines it as the new "system".
                role="system" if message.role == "developer" else message.role,
                content=text,
                images=images or None,
                tool_calls=tool_calls,
                tool_call_id=message.tool_call_id,
                tool_name=tool_names.get(message.tool_call_id or ""),
            )
        )
    return converted


def _split_content(content: openai.Content | None, index: int) -> tuple[str, list[str]]:
    if content is None or isinstance(content, str):
        return content or "", []
    texts, images = [], []
    for part in content:
        if isinstance(part, openai.TextContentPart):
            texts.append(part.text)
        elif isinstance(part, openai.ImageContentPart):
            header, _, data = part.image_url.url.partition(",")
            if not (header.startswith("data:") and header.endswith(";base64") and data):
                raise BadRequest(
                    "image_url must be a base64 data: URL; the wrapper fetches no remote images",
                    param=f"messages.{index}.content",
                )
            images.append(data)
    return "\n".join(texts), images


def _ollama_tool_call(call: openai.ToolCall, index: int) -> ollama.ToolCall:
    try:
        arguments = json.loads(call.function.arguments or "{}")
    except json.JSONDecodeError:
        arguments = None
    if not isinstance(arguments, dict):
        raise BadRequest(
            "tool call arguments must be a JSON object",
            param=f"messages.{index}.tool_calls",
        )
    function = ollama.ToolCallFunction(name=call.function.name, arguments=arguments)
    return ollama.ToolCall(id=call.id, function=function)


def ollama_options(
    body: openai.ChatCompletionRequest, max_tokens: int | None = None
) -> ollama.Options | None:
    values = {
        "temperature": body.temperature,
        "top_p": body.top_p,
        "num_predict": body.max_output_tokens or max_tokens,
        "stop": body.stop_sequences or None,
        "seed": body.seed,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
    }
    given = {name: value for name, value in values.items() if value is not None}
    return ollama.Options(**given) if given else None


def ollama_format(response_format: openai.ResponseFormat | None) -> ollama.Format:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_schema" and response_format.json_schema is not None:
        return response_format.json_schema.schema_ or "json"
    return "json"


# --- Ollama answer -> OpenAI answer ---------------------------------------------------------


def finish_reason(done_reason: str | None, tool_calls: bool) -> openai.FinishReason:
    if tool_calls:
        return "tool_calls"
    return "length" if done_reason == "length" else "stop"


def openai_logprobs(logprobs: list[ollama.Logprob] | None) -> openai.ChoiceLogprobs | None:
    if not logprobs:
        return None
    return openai.ChoiceLogprobs(
        content=[
            openai.TokenLogprob(
                token=item.token,
                logprob=item.logprob,
                bytes=item.bytes,
                top_logprobs=[
                    openai.TopLogprob(token=top.token, logprob=top.logprob, bytes=top.bytes)
                    for top in item.top_logprobs or ()
                ],
            )
            for item in logprobs
        ]
    )


def openai_tool_calls(
    calls: list[ollama.ToolCall] | None, completion_id: str
) -> list[openai.ToolCall] | None:
    if not calls:
        return None
    return [
        openai.ToolCall(
            id=call.id or f"call_{completion_id.removeprefix('chatcmpl-')}_{index}",
            function=openai.FunctionCall(
                name=call.function.name, arguments=json.dumps(call.function.arguments)
            ),
        )
        for index, call in enumerate(calls)
    ]


def usage(
    answer: ollama.ChatResponse | ollama.GenerateResponse,
    *,
    prompt: str,
    completion: str = "",
    chunks: int = 0,
) -> openai.Usage:
    """Usage from Ollama's counts; what it omits is counted or estimated.

    The prompt is estimated from its text. The completion is the number of streamed content
    chunks (Ollama streams one token per chunk) or, for a whole answer, estimated from its
    text: a call that produced text never reports zero completion tokens.
    """
    prompt_tokens = answer.prompt_eval_count
    if prompt_tokens is None:
        prompt_tokens = estimate_tokens(prompt)
    completion_tokens = answer.eval_count
    if not completion_tokens:
        completion_tokens = chunks or estimate_tokens(completion)
    return openai.Usage.of(prompt_tokens, completion_tokens)


def chat_completion(
    answer: ollama.ChatResponse, *, completion_id: str, created: int, usage: openai.Usage
) -> openai.ChatCompletion:
    tool_calls = openai_tool_calls(answer.message.tool_calls, completion_id)
    message = openai.AssistantMessage(
        content=answer.message.content if answer.message.content or not tool_calls else None,
        tool_calls=tool_calls,
    )
    choice = openai.Choice(
        message=message,
        finish_reason=finish_reason(answer.done_reason, bool(tool_calls)),
        logprobs=openai_logprobs(answer.logprobs),
    )
    return openai.ChatCompletion(
        id=completion_id, created=created, model=answer.model, choices=[choice], usage=usage
    )


def chunk(
    completion_id: str,
    created: int,
    model: str,
    *,
    delta: openai.ChunkDelta | None = None,
    finish: openai.FinishReason | None = None,
    logprobs: openai.ChoiceLogprobs | None = None,
) -> openai.ChatCompletionChunk:
    choice = openai.ChunkChoice(
        delta=delta or openai.ChunkDelta(), finish_reason=finish, logprobs=logprobs
    )
    return openai.ChatCompletionChunk(
        id=completion_id, created=created, model=model, choices=[choice]
    )


def chunk_tool_calls(
    calls: list[ollama.ToolCall] | None, completion_id: str
) -> list[openai.ChunkToolCall] | None:
    converted = openai_tool_calls(calls, completion_id)
    if not converted:
        return None
    return [
        openai.ChunkToolCall(
            index=index,
            id=call.id,
            type="function",
            function=openai.ChunkFunctionCall(
                name=call.function.name, arguments=call.function.arguments
            ),
        )
        for index, call in enumerate(converted)
    ]


def usage_chunk(
    completion_id: str, created: int, model: str, usage: openai.Usage
) -> openai.ChatCompletionChunk:
    return openai.ChatCompletionChunk(
        id=completion_id, created=created, model=model, choices=[], usage=usage
    )


# --- Ollama request -> OpenAI request, OpenAI answer -> Ollama answer ------------------------
# For a ``kind: openai`` backend: the wrapper's Ollama API served by an OpenAI-compatible
# server. The reverse of the functions above, built on them where they fit.


def openai_chat_body(request: ollama.ChatRequest) -> dict[str, Any]:
    """An Ollama ``/api/chat`` request as the OpenAI chat completion body it means."""
    body = _openai_sampling(request) | {
        "model": request.model,
        "messages": [_openai_message(message, i) for i, message in enumerate(request.messages)],
        "stream": request.stream,
    }
    if request.tools:
        body["tools"] = [tool.model_dump(exclude_none=True) for tool in request.tools]
    return body


def openai_completion_body(request: ollama.GenerateRequest) -> dict[str, Any]:
    """A raw ``/api/generate`` request as an OpenAI ``/v1/completions`` body; a templated
    one is a chat (see ``generate_as_chat``)."""
    return _openai_sampling(request) | {
        "model": request.model,
        "prompt": (request.system or "") + (request.prompt or ""),
        "stream": request.stream,
    }


def generate_as_chat(request: ollama.GenerateRequest) -> ollama.ChatRequest:
    """A templated ``/api/generate`` request as the chat it is (the server applies the
    model's template to messages, not to a prompt)."""
    messages = [ollama.Message(role="system", content=request.system)] if request.system else []
    prompt = ollama.Message(role="user", content=request.prompt or "", images=request.images)
    messages.append(prompt)
    return ollama.ChatRequest(
        model=request.model,
        messages=messages,
        stream=request.stream,
        format=request.format,
        options=request.options,
        logprobs=request.logprobs,
        top_logprobs=request.top_logprobs,
    )


def _openai_sampling(request: ollama.ChatRequest | ollama.GenerateRequest) -> dict[str, Any]:
    options = request.options or ollama.Options()
    limit = options.num_predict
    values = {
        "max_tokens": limit if limit is not None and limit > 0 else None,  # -1, -2: none
        "temperature": options.temperature,
        "top_p": options.top_p,
        "stop": options.stop or None,
        "seed": options.seed,
        "presence_penalty": options.presence_penalty,
        "frequency_penalty": options.frequency_penalty,
        "response_format": _openai_format(request.format),
        "logprobs": request.logprobs or None,
        "top_logprobs": request.top_logprobs if request.logprobs else None,
    }
    if request.stream:
        values["stream_options"] = {"include_usage": True}  # counts, where the server gives them
    return {name: value for name, value in values.items() if value is not None}


def _openai_format(format: ollama.Format) -> dict[str, Any] | None:
    if not format:
        return None
    if format == "json":
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": format}}


def _openai_message(message: ollama.Message, index: int) -> dict[str, Any]:
    content: Any = message.content
    if message.images:
        images = [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}}
            for image in message.images
        ]
        content = [{"type": "text", "text": message.content}, *images]
    data: dict[str, Any] = {"role": message.role, "content": content}
    if message.tool_calls:
        calls = openai_tool_calls(message.tool_calls, f"chatcmpl-{index}")
        data["tool_calls"] = [call.model_dump() for call in calls or ()]
    if message.role == "tool":
        data["tool_call_id"] = message.tool_call_id or message.tool_name or ""
    return data


def ollama_tool_calls(calls: list[dict[str, Any]] | None) -> list[ollama.ToolCall] | None:
    """OpenAI's tool calls (arguments as JSON text) as Ollama's (an object)."""
    if not calls:
        return None
    converted = []
    for call in calls:
        function = call.get("function") or {}
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except json.JSONDecodeError:
            arguments = {}
        converted.append(
            ollama.ToolCall(
                id=call.get("id"),
                function=ollama.ToolCallFunction(
                    name=function.get("name") or "",
                    arguments=arguments if isinstance(arguments, dict) else {},
                ),
            )
        )
    return converted


def done_reason(finish: str | None) -> str:
    """OpenAI's ``finish_reason`` as Ollama's ``done_reason``."""
    return "length" if finish == "length" else "stop"
