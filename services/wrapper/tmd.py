"""The TLC domain classifier: a query onto the Task-Method-Domain taxonomy, with the
model's own probabilities as confidences.

Each axis is one constrained choice. The prompt is the taxonomy's few-shot examples, one
JSON record per line, then the query's record up to the field asked for:
``{"query":"…","domain":``. The backend generates the value under a JSON schema whose
``enum`` is the axis's labels, so the answer is always a label, never free text.

The confidences come from the logprobs of that constrained generation. At each generated
token, the backend's ``top_logprobs`` are cut down to the tokens that keep the text a
prefix of some label and renormalised, which is the distribution the grammar samples
from. The chosen token carries the label path on; every other token's share goes to the
labels it leads to (the grammar forces the rest). Labels outside every step's top
``TOP_LOGPROBS`` get nothing, so the confidences sum to at most 1.

The same prompt prefix serves every query and the three axes of ``/extract_tmd`` extend
each other's prompts, so a backend that keeps its last prompt's cache (llama.cpp, Ollama)
only evaluates the new tokens. The stream is left as soon as the label is decided.
"""

from __future__ import annotations

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
    Taxonomy,
    Tmd,
    TmdConfidence,
)
from services.common.errors import ServiceUnavailable, ValidationFailed
from services.common.streaming import close
from services.wrapper import translate
from services.wrapper.service import Wrapper
from services.wrapper.stats import counting_failures
from services.wrapper.taxonomy import field_prompt, open_record, prompt_prefix

TOP_LOGPROBS = 20  # Ollama's maximum


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


# --- the classifier --------------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """One axis decided: labels (canonical names) with their probabilities, best first."""

    ranked: list[tuple[str, float]]
    label: str  # the words the model wrote for the best one, for the next field's prompt

    @property
    def best(self) -> tuple[str, float]:
        return self.ranked[0]


class DomainClassifier:
    def __init__(self, wrapper: Wrapper, taxonomy: Taxonomy) -> None:
        self.wrapper = wrapper
        self.taxonomy = taxonomy
        self.prefix = prompt_prefix(taxonomy)

    async def classify_domain(self, query: str, top_k: int) -> ClassifyDomainResponse:
        domains = self.taxonomy.domains
        if top_k > len(domains):
            raise ValidationFailed(
                f"top_k must be between 1 and {len(domains)}, the number of domains",
                param="top_k",
            )
        choice = await self.choose(open_record(query), "domain", domains)
        scores = [DomainScore(domain=name, confidence=p) for name, p in choice.ranked[:top_k]]
        return ClassifyDomainResponse(query=query, domains=scores, primary_domain=choice.best[0])

    async def extract_tmd(self, query: str, context_docs: Sequence[str]) -> ExtractTmdResponse:
        record = open_record(query, context_docs)
        chosen: dict[str, tuple[str, float]] = {}
        for field, labels in (
            ("domain", self.taxonomy.domains),
            ("task", self.taxonomy.tasks),
            ("method", self.taxonomy.methods),
        ):
            choice = await self.choose(record, field, labels)
            chosen[field] = choice.best
            record[field] = choice.label  # the next field's prompt extends this one's
        return ExtractTmdResponse(
            query=query,
            tmd=Tmd(**{field: name for field, (name, _) in chosen.items()}),
            confidence=TmdConfidence(**{field: p for field, (_, p) in chosen.items()}),
        )

    async def choose(self, record: dict[str, Any], field: str, labels: Sequence[Label]) -> Choice:
        """One constrained generation of ``field``'s value; the stream is left as soon as
        the label is decided."""
        words = [label.label for label in labels]
        request = api.GenerateRequest(
            model=self.wrapper.settings.model,
            prompt=field_prompt(self.prefix, record, field),
            raw=True,
            stream=True,
            format={"type": "string", "enum": words},
            options=api.Options(temperature=0, num_predict=self.wrapper.settings.max_tokens_limit),
            logprobs=True,
            top_logprobs=TOP_LOGPROBS,
        )
        job = self.wrapper.generate_job(request)
        call = self.wrapper.stats.begin("tlc", True)
        steps: list[api.Logprob] = []
        text = ""
        parts = self.wrapper.stream(job)
        try:
            with counting_failures(call):
                async for part in parts:
                    call.first_token()
                    assert isinstance(part, api.GenerateResponse)
                    steps.extend(part.logprobs or ())
                    text += part.response
                    if part.done or len(reachable(words, text.lstrip())) <= 1:  # decided
                        break
        finally:
            await close(parts)
        if not steps:
            call.failed("backend_no_logprobs")
            raise ServiceUnavailable(
                f"the model backend at {self.wrapper.settings.backend_url} answered without "
                "logprobs, which the confidences are computed from",
                code="backend_no_logprobs",
            )
        call.done(translate.estimate_tokens(job.prompt), len(steps))
        scores = label_probabilities(words, steps)
        by_words = {label.label: label.name for label in labels}
        ranked = sorted(
            ((by_words[w], round(p, 6)) for w, p in scores.items()), key=lambda item: -item[1]
        )
        best_words = max(scores, key=lambda w: scores[w])
        return Choice(ranked=ranked, label=best_words)
