"""The TLC domain classifier: a query onto the Task-Method-Domain taxonomy, with the
model's own probabilities as confidences.

Each axis is one constrained choice. The prompt is the query's JSON record, written up to
the value asked for: ``{"question":"…","field of knowledge":``. The backend generates the
value under a JSON schema whose ``enum`` is the axis's labels, so the answer is always a
label, never free text. ``/extract_tmd`` then writes the chosen domain into the record and
asks for the task, then the method.

The prompt holds no examples. A backend that cannot keep the prefix a prompt shares with
the last one (Ollama with gemma 3, whose sliding-window cache it does not roll back)
evaluates the whole prompt on every call: a few-shot prompt of ~1,300 tokens took seconds
there. This one is the query and a few tokens more, the same cost with or without a cache.

What the examples did, calibration does: a small model favours some labels whatever the
query, and each answer's label distribution is divided by that prior, the model's mean
distribution over the taxonomy's calibration queries (measured once per axis, on first
use, by asking the backend as for any query), then scaled back to the same total.

Label probabilities come from the logprobs of the constrained generation. At each
generated token, the backend's ``top_logprobs`` are cut down to the tokens that keep the
text a prefix of some label and renormalised, which is the distribution the grammar samples
from. The chosen token carries the label path on; every other token's share goes to the
labels it leads to (the grammar forces the rest). Labels outside every step's top
``TOP_LOGPROBS`` get nothing, so the confidences sum to at most 1.

A call asks for ``DECIDING_TOKENS``: the opening quote and the label's first token, which
tells the labels apart unless two begin alike; then the backend ends the stream itself,
with its counts (what it read from its prompt cache), and runs no token past the answer.
A label still open then is asked again without that limit, and left once decided.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from schemas import ollama as api
from schemas.tmd import (
    ClassifyDomainResponse,
    DomainScore,
    ExtractTmdResponse,
    Label,
    LabelledQuery,
    Taxonomy,
    Tmd,
    TmdConfidence,
)
from services.common.errors import ServiceUnavailable, ValidationFailed
from services.common.streaming import close
from services.wrapper import translate
from services.wrapper.service import Wrapper
from services.wrapper.stats import counting_failures
from services.wrapper.taxonomy import field_prompt, open_record

TOP_LOGPROBS = 20  # Ollama's maximum
DECIDING_TOKENS = 2  # the opening quote and the label's first token
AXES = ("domain", "task", "method")  # the order /extract_tmd decides them in


# --- confidences from logprobs ---------------------------------------------------------------


def label_probabilities(labels: Sequence[str], steps: Sequence[api.Logprob]) -> dict[str, float]:
    """The probability of each label, from the logprobs of a generation constrained to
    ``labels`` as JSON strings (see the module docstring); labels never reached get 0."""
    scores = dict.fromkeys(labels, 0.0)
    live = list(labels)
    text, mass = "", 1.0
    for step in steps:
        options = {top.token: top.logprob for top in step.top_logprobs or ()}
        options.setdefault(step.token, step.logprob)
        branches = {token: reachable(live, text + token) for token in options}
        weights = {t: math.exp(options[t]) for t, reached in branches.items() if reached}
        if step.token not in weights:  # not a label's text: the value has ended
            break
        total = sum(weights.values())
        for token, weight in weights.items():
            if token != step.token:
                share = mass * weight / total / len(branches[token])
                for label in branches[token]:
                    scores[label] += share
        mass *= weights[step.token] / total
        text += step.token
        live = branches[step.token]
        if len(live) == 1:  # decided: the grammar writes the rest
            break
    for label in live:  # the chosen path's mass, shared if it was left undecided
        scores[label] += mass / len(live)
    return scores


def reachable(labels: Sequence[str], text: str) -> list[str]:
    """The labels whose JSON string ``text`` (a generated value so far) can still become,
    or already holds in full."""
    found = []
    for label in labels:
        target = json.dumps(label, ensure_ascii=False)
        if target.startswith(text) or text.startswith(target):
            found.append(label)
    return found


def label_prior(rows: Sequence[dict[str, float]], labels: Sequence[str]) -> dict[str, float]:
    """The mean of the label distributions ``rows``, with one uniform row among them: a
    label the model never gave weight to on the calibration queries is rare, not
    impossible, and no label's prior is 0."""
    uniform = 1 / len(labels)
    return {
        label: (sum(row[label] for row in rows) + uniform) / (len(rows) + 1) for label in labels
    }


def calibrate(scores: dict[str, float], prior: dict[str, float]) -> dict[str, float]:
    """``scores`` divided by the model's ``prior``, scaled back to their total."""
    weights = {label: p / prior[label] for label, p in scores.items()}
    total = sum(weights.values())
    mass = sum(scores.values())
    return {label: mass * w / total if total else 0.0 for label, w in weights.items()}


# --- the classifier --------------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """One axis decided: labels (canonical names) with their probabilities, best first."""

    ranked: list[tuple[str, float]]
    label: str  # the words of the best one, for the next field's record

    @property
    def best(self) -> tuple[str, float]:
        return self.ranked[0]


class DomainClassifier:
    def __init__(self, wrapper: Wrapper, taxonomy: Taxonomy) -> None:
        self.wrapper = wrapper
        self.taxonomy = taxonomy
        self.keys = taxonomy.prompt.keys
        self.labels: dict[str, tuple[Label, ...]] = {
            "domain": taxonomy.domains,
            "task": taxonomy.tasks,
            "method": taxonomy.methods,
        }
        self.priors: dict[str, dict[str, float]] = {}
        self._calibrating = {axis: asyncio.Lock() for axis in AXES}

    async def classify_domain(self, query: str, top_k: int) -> ClassifyDomainResponse:
        domains = self.taxonomy.domains
        if top_k > len(domains):
            raise ValidationFailed(
                f"top_k must be between 1 and {len(domains)}, the number of domains",
                param="top_k",
            )
        choice = await self.choose(open_record(self.keys, query), "domain")
        scores = [DomainScore(domain=name, confidence=p) for name, p in choice.ranked[:top_k]]
        return ClassifyDomainResponse(query=query, domains=scores, primary_domain=choice.best[0])

    async def extract_tmd(self, query: str, context_docs: Sequence[str]) -> ExtractTmdResponse:
        record = open_record(self.keys, query, context_docs)
        chosen: dict[str, tuple[str, float]] = {}
        for axis in AXES:
            choice = await self.choose(record, axis)
            chosen[axis] = choice.best
            record[getattr(self.keys, axis)] = choice.label  # the next axis's record holds it
        return ExtractTmdResponse(
            query=query,
            tmd=Tmd(**{axis: name for axis, (name, _) in chosen.items()}),
            confidence=TmdConfidence(**{axis: p for axis, (_, p) in chosen.items()}),
        )

    async def choose(self, record: dict[str, Any], axis: str) -> Choice:
        """The calibrated label distribution of ``axis`` for ``record``."""
        model_prior = await self.prior(axis)  # first: on first use, it asks the backend
        scores = calibrate(await self.label_scores(record, axis), model_prior)
        by_words = {label.label: label.name for label in self.labels[axis]}
        ranked = sorted(
            ((by_words[w], round(p, 6)) for w, p in scores.items()), key=lambda item: -item[1]
        )
        return Choice(ranked=ranked, label=max(scores, key=lambda w: scores[w]))

    async def prior(self, axis: str) -> dict[str, float]:
        """The model's prior on ``axis``: measured on first use, kept for the process."""
        async with self._calibrating[axis]:
            if axis not in self.priors:
                rows = [
                    await self.label_scores(self.calibration_record(example, axis), axis)
                    for example in self.taxonomy.calibration
                ]
                words = [label.label for label in self.labels[axis]]
                self.priors[axis] = label_prior(rows, words)
        return self.priors[axis]

    def calibration_record(self, example: LabelledQuery, axis: str) -> dict[str, Any]:
        """An example's record as ``axis`` is asked for: with the labels of the axes before."""
        record = open_record(self.keys, example.query, [example.context] if example.context else ())
        for earlier in AXES[: AXES.index(axis)]:
            record[getattr(self.keys, earlier)] = getattr(example, earlier)
        return record

    async def label_scores(self, record: dict[str, Any], axis: str) -> dict[str, float]:
        """The model's distribution over ``axis``'s label words for ``record``."""
        words = [label.label for label in self.labels[axis]]
        prompt = field_prompt(record, getattr(self.keys, axis))
        steps, text = await self.generate(prompt, words, DECIDING_TOKENS)
        if len(reachable(words, text.lstrip())) > 1:  # two labels begin alike: ask to the end
            steps, _ = await self.generate(prompt, words, None)
        return label_probabilities(words, steps)

    async def generate(
        self, prompt: str, words: list[str], num_predict: int | None
    ) -> tuple[list[api.Logprob], str]:
        """One constrained generation: its logprobs and text. With ``num_predict``, read to
        the backend's last answer; without, left as soon as the label is decided."""
        request = api.GenerateRequest(
            model=self.wrapper.settings.model,
            prompt=prompt,
            raw=True,
            stream=True,
            format={"type": "string", "enum": words},
            options=api.Options(
                temperature=0, num_predict=num_predict or self.wrapper.settings.max_tokens_limit
            ),
            logprobs=True,
            top_logprobs=TOP_LOGPROBS,
        )
        job = self.wrapper.generate_job(request)
        call = self.wrapper.stats.begin("tlc", True)
        steps: list[api.Logprob] = []
        text = ""
        last: api.GenerateResponse | None = None
        parts = self.wrapper.stream(job)
        try:
            with counting_failures(call):
                async for part in parts:
                    call.first_token()
                    assert isinstance(part, api.GenerateResponse)
                    steps.extend(part.logprobs or ())
                    text += part.response
                    if part.done:
                        last = part
                        break
                    if num_predict is None and len(reachable(words, text.lstrip())) <= 1:
                        break  # decided: the grammar writes the rest
        finally:
            await close(parts)
        if not steps:
            call.failed("backend_no_logprobs")
            raise ServiceUnavailable(
                f"the model backend at {self.wrapper.settings.backend_url} answered without "
                "logprobs, which the confidences are computed from",
                code="backend_no_logprobs",
            )
        if last is None:  # left early: the backend's counts never came
            call.done(translate.estimate_tokens(job.prompt), len(steps))
        else:
            usage = translate.usage(last, prompt=job.prompt, chunks=len(steps))
            call.done(usage.prompt_tokens, usage.completion_tokens)
        return steps, text
