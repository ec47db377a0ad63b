"""Ollama API as the daemons serve it (``/api/generate``, ``/api/chat``, ``/api/tags``, ...).

Names and shapes follow Ollama's ``docs/api.md`` and the official ``ollama`` client's
``_types.py``; what these models dump with ``model_dump(exclude_none=True)`` parses with that
client. Streamed answers are NDJSON lines of the same response models with ``done=False``; a
failure mid-stream is a line ``{"error": "..."}`` (``schemas.errors.OllamaError``).
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

MAX_MESSAGES = 1024
MAX_TOP_LOGPROBS = 20

Role = Literal["system", "user", "assistant", "tool"]
# Ollama reports "stop", "length", "load" (empty prompt) and "unload" (keep_alive 0), and
# may add others, so any string is accepted.
DoneReason = Literal["stop", "length", "load", "unload"] | str
Think = bool | Literal["low", "medium", "high"]


def _check_rfc3339(value: str) -> str:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError("expected an RFC 3339 timestamp") from None
    if parsed.tzinfo is None:
        raise ValueError("an RFC 3339 timestamp needs Z or a UTC offset")
    return value


# Kept as the string Ollama sent: Go writes nanoseconds, which a datetime would truncate.
Timestamp = Annotated[str, AfterValidator(_check_rfc3339)]


def timestamp_now() -> str:
    """The current time as Ollama writes ``created_at``."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


_DURATION_PART = r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)"
_GO_DURATION = re.compile(rf"[-+]?(?:0|(?:{_DURATION_PART})+)")
_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1,
    "m": 60,
    "h": 3600,
}


def _check_keep_alive(value: int | float | str) -> int | float | str:
    if isinstance(value, str) and not _GO_DURATION.fullmatch(value):
        raise ValueError('keep_alive must be seconds or a duration such as "5m" or "1h30m"')
    return value


# Seconds, or a Go duration string; negative means "keep loaded forever".
KeepAlive = Annotated[int | float | str, AfterValidator(_check_keep_alive)]


def keep_alive_seconds(value: int | float | str | None) -> float | None:
    """``keep_alive`` in seconds: None when unset, ``math.inf`` when negative (forever)."""
    if value is None:
        return None
    if isinstance(value, str):
        sign = -1 if value.startswith("-") else 1
        parts = re.findall(_DURATION_PART, value)
        seconds = sign * sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)
    else:
        seconds = float(value)
    return math.inf if seconds < 0 else seconds


def _default_if_null(default: Any) -> BeforeValidator:
    # Go decodes ``null`` as "not given", so null means the default.
    return BeforeValidator(lambda value: default if value is None else value)


def _list_if_null(value: Any) -> Any:
    return [] if value is None else value


StreamFlag = Annotated[bool, _default_if_null(True)]
Flag = Annotated[bool, _default_if_null(False)]


def _integral_float_to_int(value: Any) -> Any:
    # Ollama reads option numbers as float64 and converts them, so 4096.0 is a valid num_ctx.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


OptionInt = Annotated[int, BeforeValidator(_integral_float_to_int)]


def _empty_format_is_none(value: Any) -> Any:
    # Ollama treats "format": "" like no format, and ollama-python's type allows it.
    return None if value == "" else value


Format = Annotated[Literal["json"] | dict[str, Any] | None, BeforeValidator(_empty_format_is_none)]


class _Input(BaseModel):
    # Strict: Ollama's JSON decoding refuses "stream": "true" or "temperature": "0.7", so we
    # do too. extra="ignore": Go's decoder skips unknown fields, and clients written for a
    # newer Ollama (truncate, shift, width, ...) must keep working.
    model_config = ConfigDict(strict=True, extra="ignore")


# --- requests --------------------------------------------------------------------------------


class Options(_Input):
    """Model options (``"options"``); unknown keys are ignored, as Ollama logs and skips them.

    Option values are not range-checked: Ollama passes them on to the runner unchecked
    (``seed: -1`` and ``num_predict: -1`` are meaningful), so we accept what it accepts.
    """

    # read when the model is loaded: changing one reloads the model
    num_ctx: OptionInt | None = None
    num_batch: OptionInt | None = None
    num_gpu: OptionInt | None = None
    main_gpu: OptionInt | None = None
    use_mmap: bool | None = None
    num_thread: OptionInt | None = None
    # still sent by ollama-python; current Ollama ignores them
    numa: bool | None = None
    low_vram: bool | None = None
    f16_kv: bool | None = None
    logits_all: bool | None = None
    vocab_only: bool | None = None
    use_mlock: bool | None = None
    embedding_only: bool | None = None

    # read on every request
    num_keep: OptionInt | None = None
    seed: OptionInt | None = None
    num_predict: OptionInt | None = None
    top_k: OptionInt | None = None
    top_p: float | None = None
    min_p: float | None = None
    typical_p: float | None = None
    repeat_last_n: OptionInt | None = None
    temperature: float | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: list[str] | None = None
    # still sent by ollama-python; current Ollama ignores them
    tfs_z: float | None = None
    mirostat: OptionInt | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    penalize_newline: bool | None = None


class ToolCallFunction(_Input):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    index: int | None = None


class ToolCall(_Input):
    id: str | None = None
    function: ToolCallFunction


class Message(_Input):
    """A chat message, in requests and in ``ChatResponse.message``."""

    # Ollama lower-cases the role before using it.
    role: Annotated[Role, BeforeValidator(lambda v: v.lower() if isinstance(v, str) else v)]
    content: Annotated[str, _default_if_null("")] = ""
    thinking: str | None = None
    images: list[str] | None = Field(default=None, description="Base64-encoded images.")
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None


class ToolFunction(_Input):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="A JSON schema.")


class Tool(_Input):
    type: str = "function"
    function: ToolFunction


class GenerateRequest(_Input):
    """Body of ``POST /api/generate``."""

    model: str = Field(min_length=1)
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    stream: StreamFlag = True
    raw: Flag = False
    format: Format = None
    options: Options | None = None
    keep_alive: KeepAlive | None = None
    images: list[str] | None = Field(default=None, description="Base64-encoded images.")
    think: Think | None = None
    logprobs: Flag = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)


class ChatRequest(_Input):
    """Body of ``POST /api/chat``."""

    model: str = Field(min_length=1)
    messages: Annotated[list[Message], BeforeValidator(_list_if_null)] = Field(
        default_factory=list, max_length=MAX_MESSAGES
    )
    stream: StreamFlag = True
    format: Format = None
    options: Options | None = None
    keep_alive: KeepAlive | None = None
    tools: list[Tool] | None = None
    think: Think | None = None
    logprobs: Flag = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)


class ShowRequest(_Input):
    """Body of ``POST /api/show``."""

    model: str = Field(min_length=1)
    verbose: Flag = False
    system: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _legacy_name(cls, data: Any) -> Any:
        # Ollama still accepts the deprecated "name" when "model" is missing.
        if isinstance(data, dict) and not data.get("model") and data.get("name"):
            return {**data, "model": data["name"]}
        return data


# --- responses -------------------------------------------------------------------------------

Nanoseconds = Annotated[int, Field(ge=0)]
Count = Annotated[int, Field(ge=0)]


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class Logprob(TokenLogprob):
    top_logprobs: list[TokenLogprob] | None = None


# The metric fields are repeated, not inherited, to keep Ollama's field order on the wire.
# All are optional because Ollama omits zero values (prompt_eval_count on a cached prompt).


class _ModelAnswer(BaseModel):
    """What generate and chat answers share: timings in ns and token counts (any omitted)."""

    model: str
    created_at: Timestamp
    done: bool
    done_reason: DoneReason | None = None
    total_duration: Nanoseconds | None = None
    load_duration: Nanoseconds | None = None
    # The whole prompt, whether its tokens were evaluated or read from the cache: Ollama's
    # runner counts the prompt before it loads the cache (runner/ollamarunner/runner.go,
    # numPromptInputs), ollama/ollama#16428 keeps that "full-context" count on 0.30's
    # llama-server engine, and docs.ollama.com/api/usage says "how many input tokens were
    # in the prompt". (Ollama 0.1.x omitted it on a cached prompt: ollama/ollama#2068.)
    prompt_eval_count: Count | None = None
    # The part of it read from the cache, not evaluated (ollama/ollama#17943, Aug 2026;
    # docs.ollama.com/api/usage: "how many prompt tokens were read from the cache"). Older
    # Ollama releases do not say, whether or not they reused the prompt.
    prompt_eval_cached_count: Count | None = None
    prompt_eval_duration: Nanoseconds | None = None  # of the tokens not read from the cache
    eval_count: Count | None = None
    eval_duration: Nanoseconds | None = None
    logprobs: list[Logprob] | None = None


class GenerateResponse(_ModelAnswer):
    """Answer of ``POST /api/generate``, or one NDJSON line of its stream."""

    response: str = ""
    thinking: str | None = None
    context: list[int] | None = None


class ChatResponse(_ModelAnswer):
    """Answer of ``POST /api/chat``, or one NDJSON line of its stream."""

    message: Message


class ModelDetails(BaseModel):
    parent_model: str = ""
    format: str = ""
    family: str = ""
    families: list[str] | None = None
    parameter_size: str = ""
    quantization_level: str = ""


class ListedModel(BaseModel):
    """One entry of ``GET /api/tags``."""

    name: str
    model: str
    modified_at: Timestamp
    size: int = Field(ge=0, description="Bytes.")
    digest: str
    details: ModelDetails = Field(default_factory=ModelDetails)


class ListResponse(BaseModel):
    """Answer of ``GET /api/tags``."""

    models: list[ListedModel]


class VersionResponse(BaseModel):
    """Answer of ``GET /api/version``."""

    version: str


class ShowResponse(BaseModel):
    """Answer of ``POST /api/show``."""

    license: str | None = None
    modelfile: str | None = None
    parameters: str | None = None
    template: str | None = None
    system: str | None = None
    details: ModelDetails = Field(default_factory=ModelDetails)
    messages: list[Message] | None = None
    # Always written, even empty: ollama-python declares model_info without a default.
    model_info: dict[str, Any] = Field(default_factory=dict)
    capabilities: list[str] | None = None
    modified_at: Timestamp | None = None


class RunningModel(BaseModel):
    """One entry of ``GET /api/ps``."""

    name: str
    model: str
    size: int = Field(ge=0, description="Bytes.")
    digest: str
    details: ModelDetails = Field(default_factory=ModelDetails)
    expires_at: Timestamp
    size_vram: int = Field(ge=0, description="Bytes.")
    context_length: int | None = None


class ProcessResponse(BaseModel):
    """Answer of ``GET /api/ps``."""

    models: list[RunningModel]


# --- embeddings ------------------------------------------------------------------------------

MAX_EMBED_INPUTS = 2048
"""Inputs of one embedding request at most (OpenAI's bound on its input arrays)."""


class EmbedRequest(_Input):
    """Body of ``POST /api/embed``: ``input`` a string or a list of strings; none (or an
    empty string or list) only loads the model, as in Ollama."""

    model: str = Field(min_length=1)
    input: str | Annotated[list[str], Field(max_length=MAX_EMBED_INPUTS)] | None = None
    truncate: bool | None = None
    """Cut each input to the context length (the default); false: 400 for a longer one."""
    dimensions: int | None = Field(default=None, ge=1)
    """Keep the vectors' first ``dimensions`` values (normalised again)."""
    options: Options | None = None
    keep_alive: KeepAlive | None = None


class EmbedResponse(BaseModel):
    """Answer of ``POST /api/embed``: one unit-length vector per input, in order."""

    model: str
    embeddings: list[list[float]]
    total_duration: Nanoseconds | None = None
    load_duration: Nanoseconds | None = None
    prompt_eval_count: Count | None = None


class EmbeddingsRequest(_Input):
    """Body of the legacy ``POST /api/embeddings``; an empty ``prompt`` only loads the model."""

    model: str = Field(min_length=1)
    prompt: str | None = None
    options: Options | None = None
    keep_alive: KeepAlive | None = None


class EmbeddingsResponse(BaseModel):
    """Answer of ``POST /api/embeddings``: the vector as the model gives it, not normalised."""

    embedding: list[float]
