"""Embeddings from the loaded model: a second llama.cpp context on the same weights.

Choices, and why:

- **A second context, not a second model.** ``llama_init_from_model`` makes a context on
  the model the generation context already holds: the weights are shared, and the
  embedding context brings only its KV cache and buffers. Measured for SmolLM2 at a 2,048
  token context: +54 MB of RSS when it is made, +103 MB once it has embedded 1,000 tokens
  (the process holds 247 MB with the model loaded). It is made on the first embedding
  call, so a host that never embeds never pays for it.
- **Not the generation context switched to embeddings** (``llama_set_embeddings``): its
  pooling is fixed when it is made, and every embedding would evict the prompt the next
  generation could reuse (``engine``'s prompt cache).
- **Pooling per the model.** A GGUF that names its pooling (``<arch>.pooling_type``, the
  embedding models) gets it from llama.cpp, the whole input in one decode, as pooling
  needs. A generative model names none, and gets the last token's final hidden state, as
  Ollama: for SmolLM2 on this machine our vector of "hello world" is Ollama 0.24's legacy
  vector to the last bit, and at cosine 1.0000 with its ``/api/embed`` one (mean pooling
  gave 0.94). It is decoded in chunks of ``LAST_TOKEN_CHUNK`` tokens: an embedding context
  outputs every token it decodes, logits included (a 49k-float row each for SmolLM2), so
  one decode of 1,000 tokens cost 300 MB more than chunks of 128 do, for the same time.
- **One model thread.** Calls run in the engine's model thread, in a turn of the host's
  queue (``queue.ModelQueue``) like a generation: llama.cpp's threads would only fight
  over the same cores, and the queue's 503 and wait figures cover embeddings too.
  An input is embedded at about the speed a generation evaluates its prompt (1,000 tokens
  side by side on one busy thread of this 2-core machine: 8.9 s against 8.0 s).

``/api/embed`` and ``/v1/embeddings`` normalise the vectors to unit length, as Ollama does;
the legacy ``/api/embeddings`` gives them as the model does (``embed_routes``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import llama_cpp
import numpy as np
from llama_cpp import Llama
from prometheus_client import Counter, Histogram

from services.common.metrics import LLM_DURATION_BUCKETS

LAST_TOKEN_CHUNK = 128
"""Tokens per decode for a last-token embedding (see the module docstring)."""


class EmbeddingMetrics:
    """The embeddings' figures for ``/metrics`` (registered by the app, as the queue's)."""

    def __init__(self) -> None:
        self.inputs = Counter(
            "modelhost_embedding_inputs", "Inputs embedded (one vector each).", registry=None
        )
        self.tokens = Counter(
            "modelhost_embedding_tokens", "Tokens of the inputs embedded.", registry=None
        )
        self.seconds = Histogram(
            "modelhost_embedding_seconds",
            "Time an embedding request held the model.",
            buckets=(0.001, *LLM_DURATION_BUCKETS),
            registry=None,
        )

    def collectors(self) -> list[Counter | Histogram]:
        return [self.inputs, self.tokens, self.seconds]


@dataclass
class Embedded:
    """One request's vectors (as the model gives them) and its timings in nanoseconds."""

    vectors: list[np.ndarray]
    tokens: int
    ready_at: int = 0
    """perf_counter_ns() when the model became this request's."""
    duration: int = 0


class Embedder:
    """The embedding context on ``llama``'s model; use it from the model thread only."""

    def __init__(self, llama: Llama) -> None:
        self.llama = llama
        self.n_ctx = llama.n_ctx()
        self.n_embd = llama.n_embd()
        self.metrics = EmbeddingMetrics()
        arch = llama.metadata.get("general.architecture", "")
        self.pooled = f"{arch}.pooling_type" in llama.metadata
        """The GGUF names its pooling (an embedding model); else the last token's state."""
        # Pooling needs a sequence in one decode; the last token's state comes from the
        # last of several, each small (see the module docstring on memory).
        self._chunk = self.n_ctx if self.pooled else min(LAST_TOKEN_CHUNK, self.n_ctx)
        self._ctx: llama_cpp.llama_context_p | None = None
        self._batch: llama_cpp.llama_batch | None = None

    def _context(self) -> llama_cpp.llama_context_p:
        if self._ctx is None:
            params = llama_cpp.llama_context_default_params()
            params.n_ctx = self.n_ctx
            params.n_batch = params.n_ubatch = self._chunk
            params.n_seq_max = 1
            params.n_threads = self.llama.context_params.n_threads
            params.n_threads_batch = self.llama.context_params.n_threads_batch
            params.embeddings = True
            params.pooling_type = (
                llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED  # the model's own
                if self.pooled
                else llama_cpp.LLAMA_POOLING_TYPE_NONE  # per token: we read the last one
            )
            ctx = llama_cpp.llama_init_from_model(self.llama.model, params)
            if not ctx:
                raise RuntimeError("llama.cpp could not make an embedding context")
            self._batch = llama_cpp.llama_batch_init(self._chunk, 0, 1)
            self._ctx = ctx
        return self._ctx

    def embed(self, inputs: Sequence[Sequence[int]], stop: threading.Event) -> Embedded:
        """One vector per input (each already fits the context); stops between inputs once
        ``stop`` is set (its caller is gone)."""
        started = time.perf_counter_ns()
        vectors = []
        for tokens in inputs:
            if stop.is_set():
                break
            vectors.append(self._embed_one(tokens))
        count = sum(len(t) for t in inputs[: len(vectors)])
        duration = time.perf_counter_ns() - started
        self.metrics.inputs.inc(len(vectors))
        self.metrics.tokens.inc(count)
        self.metrics.seconds.observe(duration / 1e9)
        return Embedded(vectors, tokens=count, duration=duration)

    def _embed_one(self, tokens: Sequence[int]) -> np.ndarray:
        ctx = self._context()
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        for start in range(0, len(tokens), self._chunk):
            self._decode(ctx, tokens[start : start + self._chunk], start)
        if self.pooled:
            found = llama_cpp.llama_get_embeddings_seq(ctx, 0)
        else:
            found = llama_cpp.llama_get_embeddings_ith(ctx, -1)
        if not found:
            raise RuntimeError("llama.cpp gave no embedding")
        return np.ctypeslib.as_array(found, shape=(self.n_embd,)).copy()

    def _decode(self, ctx: llama_cpp.llama_context_p, tokens: Sequence[int], at: int) -> None:
        batch = self._batch
        assert batch is not None
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = at + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = True  # an embedding context outputs every token regardless
        batch.n_tokens = len(tokens)
        if (status := llama_cpp.llama_decode(ctx, batch)) != 0:
            raise RuntimeError(f"llama_decode failed ({status}) on an embedding input")

    def close(self) -> None:
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None


def normalised(vector: np.ndarray) -> np.ndarray:
    """``vector`` at unit length (a zero vector as it is), as Ollama's ``normalize``."""
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector
