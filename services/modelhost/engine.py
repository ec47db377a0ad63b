"""The loaded model: one llama.cpp context, one generation at a time.

A ``Llama`` object is not thread-safe. The engine owns one model thread (a single-worker
executor) that makes every llama.cpp call of a generation, and a bounded first-come
first-served queue (``queue.ModelQueue``, one slot) that gives the model to one generation
at a time. Tokens cross to the event loop through an asyncio queue
(``call_soon_threadsafe``), so the loop never waits on the model. A generation whose
consumer goes away (a client disconnect closes the iterator) is told to stop before its
next token, and the model is handed on only once the model thread has let go of it.

Logprobs: llama-cpp-python's own logprobs need ``logits_all=True`` at load, which keeps an
``n_ctx x n_vocab`` float32 array (400 MB for SmolLM2 at 2,048 tokens, 2 GB for Gemma 3's
262k vocabulary) and copies every prompt position's logits into it on each decode. We load
without it and read the one row that matters, the logits the token was sampled from, from
the context at each step (``llama_get_logits_ith(ctx, -1)``): a log-softmax and a partial
sort over the vocabulary, measured at 0.5 ms (SmolLM2, 49k tokens) and 2 ms (Gemma 3, 262k)
per token, 4% and 9% of a token's time, paid only by requests that ask for logprobs. They
are the model's own probabilities (before temperature, penalties or grammar), which is what
a classifier reading label probabilities wants.

Prompt cache: a generation keeps the longest prefix its prompt shares with what the
context holds from the last one, and evaluates only the rest (llama-cpp-python's
``generate`` does the same, but says nothing of it; the engine decides it, so it can count
it). ``Outcome`` reports it as Ollama does: ``prompt_eval_count`` is the whole prompt and
``prompt_eval_cached_count`` the tokens read from the cache. With the cache off, every
generation evaluates its whole prompt, as on a backend that cannot keep it.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import functools
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import anyio
import llama_cpp
import numpy as np
from llama_cpp import Llama, LogitsProcessorList, llama_chat_format
from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from schemas.ollama import Logprob, Options, TokenLogprob
from services.common.errors import BadRequest
from services.modelhost.catalog import PackagedModel, file_sha256, locate, lookup
from services.modelhost.embedder import Embedded, Embedder
from services.modelhost.grammar import GrammarConstraint
from services.modelhost.queue import ModelQueue, Ticket
from services.modelhost.settings import ModelHostSettings, default_threads

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """Per-request sampling options; the defaults are Ollama's."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.0
    typical_p: float = 1.0
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    seed: int | None = None

    @classmethod
    def from_options(cls, options: Options | None) -> Sampling:
        if options is None:
            return cls()
        given = options.model_dump(exclude_none=True)
        return cls(**{f.name: given[f.name] for f in fields(cls) if f.name in given})


@dataclass(frozen=True)
class Job:
    """One generation, ready to run: the prompt is already tokens."""

    tokens: list[int]
    sampling: Sampling = Sampling()
    num_predict: int | None = None
    """Tokens to generate at most; None or <= 0: until the context is full."""
    stop: Sequence[str] = ()
    grammar: str | None = None
    """GBNF the answer must match."""
    top_logprobs: int | None = None
    """None: no logprobs; 0: the chosen token's only; n: also the n most likely."""


@dataclass(frozen=True)
class Piece:
    """A streamed part of the answer, with the logprobs of the tokens it completes."""

    text: str
    logprobs: list[Logprob] | None = None


@dataclass
class Outcome:
    """How a generation ended; durations in nanoseconds."""

    done_reason: str
    prompt_eval_count: int
    """The whole prompt, cached or not (Ollama's meaning)."""
    prompt_eval_cached_count: int
    """The prompt's first tokens, kept in the context from the last generation."""
    prompt_eval_duration: int
    """The time to evaluate the rest."""
    eval_count: int
    eval_duration: int
    tokens: list[int]
    """Prompt and answer, which /api/generate returns as ``context``."""
    ready_at: int = 0
    """perf_counter_ns() when the model became this generation's."""


_END = object()

WARM_UP_PROMPT_TOKENS = 128
WARM_UP_TEXT = (
    "The registry keeps a record of every model service in the swarm, with its capabilities, "
    "its endpoint and the time it last reported. A router reads those records, prefers a local "
    "model that costs nothing, and falls back to another candidate when a call fails."
)


async def _let_go(worker: asyncio.Future, stop: threading.Event) -> None:
    """Stop the model thread's call and wait until it has let go of the model. Shielded:
    under cancellation (a disconnect) too, the next call may use the model only then."""
    stop.set()
    with anyio.CancelScope(shield=True):
        await asyncio.wait([worker])


class Engine:
    """A loaded model and the one-at-a-time access to it."""

    def __init__(
        self,
        llama: Llama,
        model: PackagedModel,
        path: Path,
        *,
        load_duration: int,
        digest: str,
        max_pending: int = 64,
        prompt_cache: bool = True,
    ) -> None:
        self.llama = llama
        self.model = model
        self.path = path
        self.load_duration = load_duration
        self.digest = digest
        self.prompt_cache = prompt_cache
        self.n_ctx = llama.n_ctx()
        self.n_vocab = llama.n_vocab()
        self._vocab = llama_cpp.llama_model_get_vocab(llama.model)
        # An embedding model has no chat template and is never asked to render one.
        self._formatter = _chat_formatter(llama, model.chat_format) if model.generates else None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama")
        # One llama.cpp context: one generation at a time.
        self.queue = ModelQueue(limit=max_pending, slots=1)
        self._token_texts: dict[int, tuple[str, list[int]]] = {}
        self.warmed_up: Outcome | None = None
        """The warm-up decode, once it succeeded: the host is ready to serve."""
        self.embedder = Embedder(llama)

    def model_info(self) -> dict[str, Any]:
        """GGUF metadata as Ollama's ``model_info``, plus what llama.cpp computes."""
        metadata, model = self.llama.metadata, self.llama.model
        info = {k: _metadata_value(v) for k, v in sorted(metadata.items()) if "template" not in k}
        arch = metadata.get("general.architecture", self.model.family)
        info["general.parameter_count"] = llama_cpp.llama_model_n_params(model)
        info[f"{arch}.embedding_length"] = self.llama.n_embd()
        info.setdefault(f"{arch}.context_length", llama_cpp.llama_model_n_ctx_train(model))
        return info

    # --- preparing a job (any thread: templates and the vocabulary are read-only) ---------

    def render_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> tuple[str, bool, list[str]]:
        """The prompt for ``messages``: (text, whether it holds BOS already, stop strings).
        ``tools`` go to a template that renders them (``tools.template_renders_tools``)."""
        if self.model.system_in_first_user:
            messages = _system_into_first_user(messages)
        try:
            result = self._formatter(messages=messages, tools=tools)
        except Exception as exc:  # jinja2 errors and the template's raise_exception()
            raise BadRequest(f"cannot apply the chat template: {exc}") from None
        stop = result.stop if isinstance(result.stop, list) else [result.stop]
        return result.prompt, result.added_special, [s for s in stop if s]

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        # special=True: templates and raw prompts write control tokens as text.
        return self.llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def check_fits(self, tokens: Sequence[int]) -> None:
        """Refuse a prompt that leaves no room for an answer in the context."""
        if len(tokens) >= self.n_ctx:
            raise BadRequest(
                f"the input length ({len(tokens)} tokens) exceeds the context length "
                f"({self.n_ctx} tokens)"
            )

    def check_grammar(self, grammar: str) -> None:
        """Refuse (400) a grammar llama.cpp cannot load, before the job waits in the queue:
        a schema the converter takes can still give one (``{"type": []}``), and found
        while running, it was a 500."""
        try:
            GrammarConstraint(self.llama, grammar).close()
        except ValueError as exc:
            raise BadRequest(f"invalid JSON schema in format: {exc}") from None

    def check_tokens(self, tokens: Sequence[int]) -> None:
        if any(not 0 <= token < self.n_vocab for token in tokens):
            raise BadRequest(f"context holds token ids outside the vocabulary (0..{self.n_vocab})")

    # --- running it ------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self.queue.running > 0

    async def generate(self, job: Job, ticket: Ticket) -> AsyncIterator[Piece | Outcome]:
        """Run ``job`` in ``ticket``'s turn (``queue.enter()`` gives one): wait for the
        model, yield the pieces, then the Outcome, and hand the model on.

        Close the iterator early (``contextlib.aclosing``) to stop the generation.
        """
        async with ticket.turn():
            ready_at = time.perf_counter_ns()
            loop = asyncio.get_running_loop()
            pieces: asyncio.Queue[Any] = asyncio.Queue()
            stop = threading.Event()

            def emit(item: Any) -> None:
                loop.call_soon_threadsafe(pieces.put_nowait, item)

            def run() -> Outcome:
                try:
                    return self._run(job, emit, stop)
                finally:
                    emit(_END)

            worker = loop.run_in_executor(self._executor, run)
            try:
                while (item := await pieces.get()) is not _END:
                    yield item
                outcome = await worker
            finally:
                await _let_go(worker, stop)
            outcome.ready_at = ready_at
            yield outcome

    async def embed(self, inputs: Sequence[Sequence[int]], ticket: Ticket) -> Embedded:
        """One vector per input, computed in ``ticket``'s turn in the model thread
        (``embedder``); cancelled, it stops before the next input and hands the model on
        once the model thread has let go of it."""
        async with ticket.turn():
            ready_at = time.perf_counter_ns()
            stop = threading.Event()
            worker = asyncio.get_running_loop().run_in_executor(
                self._executor, self.embedder.embed, inputs, stop
            )
            try:
                embedded = await asyncio.shield(worker)
            finally:
                await _let_go(worker, stop)
        embedded.ready_at = ready_at
        return embedded

    def _run(self, job: Job, emit: Callable[[Any], None], stop: threading.Event) -> Outcome:
        """The generation loop, in the model thread."""
        llama, s = self.llama, job.sampling
        seeded = s.seed is not None and s.seed >= 0
        llama.set_seed(s.seed if seeded else llama_cpp.LLAMA_DEFAULT_SEED)  # default: random
        llama.last_n_tokens_size = self.n_ctx if s.repeat_last_n < 0 else s.repeat_last_n
        room = self.n_ctx - len(job.tokens)
        limit = min(job.num_predict, room) if job.num_predict and job.num_predict > 0 else room
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text = _TextStream(job.stop)
        answer: list[int] = []
        reason = "length"
        started = time.perf_counter_ns()
        first: int | None = None
        constraint = GrammarConstraint(llama, job.grammar) if job.grammar else None
        cached = self._keep_prefix(job.tokens)
        tokens = llama.generate(
            job.tokens[cached:],
            reset=False,  # the context holds the kept prefix; generate evaluates the rest
            temp=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            min_p=s.min_p,
            typical_p=s.typical_p,
            repeat_penalty=s.repeat_penalty,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            mirostat_mode=s.mirostat,
            mirostat_tau=s.mirostat_tau,
            mirostat_eta=s.mirostat_eta,
            logits_processor=LogitsProcessorList([constraint]) if constraint else None,
        )
        try:
            for token in tokens:
                if first is None:
                    first = time.perf_counter_ns()  # the prompt is evaluated
                if stop.is_set():
                    reason = "cancelled"
                    break
                if self._ends_turn(token):
                    reason = "stop"
                    break
                answer.append(token)
                logprob = None if job.top_logprobs is None else self._logprob(token, job)
                piece, stopped = text.feed(decoder.decode(llama.detokenize([token])), logprob)
                if piece is not None:
                    emit(piece)
                if stopped:
                    reason = "stop"
                    break
                if len(answer) >= limit:
                    break
        finally:
            tokens.close()
            if constraint is not None:
                constraint.close()
        ended = time.perf_counter_ns()
        if not text.stopped:
            piece = text.finish(decoder.decode(b"", final=True))
            if piece is not None:
                emit(piece)
        first = first or ended
        return Outcome(
            done_reason=reason,
            prompt_eval_count=len(job.tokens),
            prompt_eval_cached_count=cached,
            prompt_eval_duration=first - started,
            eval_count=len(answer),
            eval_duration=ended - first,
            tokens=[*job.tokens, *answer],
        )

    def _keep_prefix(self, tokens: Sequence[int]) -> int:
        """Keep in the context the longest prefix ``tokens`` share with what it holds, short
        of the last prompt token (evaluated again, for the logits the first answer token is
        sampled from); drop the rest. The number of tokens kept: 0 with the cache off."""
        llama = self.llama
        held = llama.input_ids[: llama.n_tokens]
        size = max(0, min(len(held), len(tokens) - 1)) if self.prompt_cache else 0
        differ = np.flatnonzero(held[:size] != np.asarray(tokens[:size]))
        keep = int(differ[0]) if differ.size else size
        memory = llama_cpp.llama_get_memory(llama.ctx)
        # A cache that cannot drop part of a sequence (recurrent models) starts over.
        if keep > 0 and llama_cpp.llama_memory_seq_rm(memory, -1, keep, -1):
            llama.n_tokens = keep
            return keep
        llama.reset()
        return 0

    def _ends_turn(self, token: int) -> bool:
        # End of generation (EOS, <|im_end|>, <end_of_turn>) or any other control token
        # (<|im_start|>, ...): in every template these mark turn boundaries, never text.
        return bool(
            llama_cpp.llama_vocab_is_eog(self._vocab, token)
            or llama_cpp.llama_vocab_is_control(self._vocab, token)
        )

    def _logprob(self, token: int, job: Job) -> Logprob:
        logits = np.ctypeslib.as_array(
            llama_cpp.llama_get_logits_ith(self.llama.ctx, -1), shape=(self.n_vocab,)
        )
        peak = logits.max()
        log_z = peak + np.log(np.exp(logits - peak).sum())
        top = None
        if k := min(job.top_logprobs or 0, self.n_vocab):
            ids = np.argpartition(logits, -k)[-k:]
            ids = ids[np.argsort(logits[ids])[::-1]]
            top = [self._token_logprob(int(i), float(logits[i] - log_z)) for i in ids]
        chosen, raw = self._token_text(token)
        return Logprob(
            token=chosen, logprob=float(logits[token] - log_z), bytes=raw, top_logprobs=top
        )

    def _token_logprob(self, token: int, logprob: float) -> TokenLogprob:
        text, raw = self._token_text(token)
        return TokenLogprob(token=text, logprob=logprob, bytes=raw)

    def _token_text(self, token: int) -> tuple[str, list[int]]:
        cached = self._token_texts.get(token)
        if cached is None:
            raw = self.llama.detokenize([token], special=True)
            cached = self._token_texts[token] = (raw.decode("utf-8", errors="replace"), list(raw))
        return cached

    def warm_up(self) -> Outcome:
        """Decode a prompt of over a hundred tokens and a few more, in the calling thread,
        before the host says it is ready.

        A llama.cpp build with instructions this CPU cannot run dies here (SIGILL), not on
        a caller's first prompt: prompt batches take other kernels than single tokens, so
        loading the model or decoding one token proves nothing. Only while nobody else can
        use the engine (``load_engine`` calls it).
        """
        tokens = self.tokenize(WARM_UP_TEXT)
        while len(tokens) < WARM_UP_PROMPT_TOKENS:
            tokens += self.tokenize(WARM_UP_TEXT, add_bos=False)
        if not self.model.generates:
            self.warmed_up = self._warm_up_embedding(tokens)
            return self.warmed_up
        job = Job(tokens=tokens, sampling=Sampling(temperature=0.0), num_predict=8)
        self.warmed_up = self._run(job, lambda _: None, threading.Event())
        return self.warmed_up

    def _warm_up_embedding(self, tokens: list[int]) -> Outcome:
        """An embedding model's warm-up: one real embedding, which must come out a vector
        of the model's width with a length (a host is ready only when it can do its job)."""
        embedded = self.embedder.embed([tokens], threading.Event())
        vector = embedded.vectors[0]
        if vector.shape != (self.embedder.n_embd,) or not np.isfinite(vector).all():
            raise RuntimeError(f"the warm-up embedding is not {self.embedder.n_embd} numbers")
        if not np.linalg.norm(vector) > 0:
            raise RuntimeError("the warm-up embedding is all zeros")
        return Outcome(
            done_reason="stop",
            prompt_eval_count=len(tokens),
            prompt_eval_cached_count=0,
            prompt_eval_duration=embedded.duration,
            eval_count=0,
            eval_duration=0,
            tokens=tokens,
        )

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.embedder.close()  # before the model it was made on
        self.llama.close()


class _TextStream:
    """Answer text on its way out, held back while it could begin a stop sequence.

    Logprobs travel with the text of their token: a token's entry goes out with the piece
    that carries the start of its text, and tokens cut off by a stop sequence are dropped.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.entries: list[tuple[int, Logprob]] = []  # (offset of the text in pending, entry)
        self.stopped = False

    def feed(self, text: str, logprob: Logprob | None) -> tuple[Piece | None, bool]:
        if logprob is not None:
            self.entries.append((len(self.pending), logprob))
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._take(min(hits), drop_rest=True), True
        held = max((_partial_match(self.pending, s) for s in self.stops), default=0)
        return self._take(len(self.pending) - held), False

    def finish(self, text: str) -> Piece | None:
        self.pending += text
        return self._take(len(self.pending))

    def _take(self, n: int, *, drop_rest: bool = False) -> Piece | None:
        everything = n == len(self.pending)
        out = self.pending[:n]
        sent = [entry for start, entry in self.entries if everything or start < n]
        if everything or drop_rest:
            self.pending, self.entries = "", []
        else:
            self.pending = self.pending[n:]
            self.entries = [(start - n, entry) for start, entry in self.entries if start >= n]
        if not out and not sent:
            return None
        return Piece(out, sent or None)


def _metadata_value(text: str) -> Any:
    # llama.cpp hands GGUF metadata over as strings; Ollama's model_info has numbers.
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return kind(text)
    return {"true": True, "false": False}.get(text, text)


def _partial_match(text: str, stop: str) -> int:
    """Length of the longest end of ``text`` that begins ``stop`` (and is not all of it)."""
    for size in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:size]):
            return size
    return 0


def _system_into_first_user(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [m for m in messages if m["role"] != "system"]
    if system:
        for i, message in enumerate(rest):
            if message["role"] == "user":
                rest[i] = {**message, "content": f"{system}\n\n{message['content']}"}
                break
        else:
            rest.insert(0, {"role": "user", "content": system})
    return rest


def _chat_formatter(llama: Llama, chat_format: str | None) -> Callable[..., Any]:
    """The prompt renderer: the GGUF's own template, or llama-cpp-python's ``format_<name>``."""
    if chat_format is not None:
        formatter = getattr(llama_chat_format, f"format_{chat_format.replace('-', '_')}", None)
        if formatter is None:
            raise ValueError(f"llama-cpp-python has no chat format {chat_format!r}")
        return formatter
    template = llama.metadata.get("tokenizer.chat_template")
    if not template:
        raise ValueError("the GGUF has no chat template; set a chat_format in the catalog")
    eos, bos = llama.token_eos(), llama.token_bos()
    return llama_chat_format.Jinja2ChatFormatter(
        template=template,
        eos_token=llama.detokenize([eos], special=True).decode() if eos >= 0 else "",
        bos_token=llama.detokenize([bos], special=True).decode() if bos >= 0 else "",
    )


@functools.lru_cache(maxsize=128)
def _schema_grammar(schema_json: str) -> str:
    return json_schema_to_gbnf(schema_json)


def grammar_for(format: str | dict[str, Any] | None) -> str | None:
    """GBNF for Ollama's ``format``: "json" (any JSON object) or a JSON schema."""
    if format is None:
        return None
    if format == "json":
        return JSON_GBNF
    try:
        return _schema_grammar(json.dumps(format))  # key order is the answer's order
    except Exception as exc:  # the converter asserts on what it does not support
        raise BadRequest(f"invalid JSON schema in format: {exc}") from None


def load_engine(settings: ModelHostSettings) -> Engine:
    """Locate and load the settings' model (blocking: call it in a worker thread)."""
    model = lookup(settings.model)
    path = locate(model, settings.models_dir)
    threads = settings.threads or default_threads()
    n_ctx = min(settings.context_length, model.max_context or settings.context_length)
    if n_ctx < settings.context_length:
        log.info("%s: context capped at the %d positions it has", model.name, n_ctx)
    started = time.perf_counter_ns()
    llama = Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=min(settings.batch_size, n_ctx),
        n_threads=threads,
        n_threads_batch=threads,
        chat_format=model.chat_format,
        logits_all=False,  # see the module docstring: logprobs come from the sampled step
        verbose=False,
    )
    load_duration = time.perf_counter_ns() - started
    log.info("loaded %s from %s in %.0f ms", model.name, path, load_duration / 1e6)
    engine = Engine(
        llama,
        model,
        path,
        load_duration=load_duration,
        digest=file_sha256(path),
        max_pending=settings.max_pending,
        prompt_cache=settings.prompt_cache,
    )
    log.info("warm-up: %s", describe_speed(engine.warm_up()))
    return engine


def describe_speed(outcome: Outcome) -> str:
    prompt_s, eval_s = outcome.prompt_eval_duration / 1e9, outcome.eval_duration / 1e9
    return (
        f"{outcome.prompt_eval_count} prompt tokens in {prompt_s * 1e3:.0f} ms "
        f"({outcome.prompt_eval_count / max(prompt_s, 1e-9):.0f} tok/s), "
        f"{outcome.eval_count} tokens in {eval_s * 1e3:.0f} ms "
        f"({outcome.eval_count / max(eval_s, 1e-9):.1f} tok/s)"
    )
