"""The TMD taxonomy as the classifier uses it: loaded from config, domain names
validated and corrected, and the query's record the prompt is written from."""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from schemas.errors import describe_validation_errors
from schemas.tmd import PromptKeys, Taxonomy, ValidateDomainResponse

CONTEXT_DOC_PROMPT_CHARS = 240  # of each context document, in the prompt
MAX_SUGGESTIONS = 3


class TaxonomyError(ValueError):
    """A taxonomy file that cannot be used; the message names the file and the key."""


def load_taxonomy(path: Path) -> Taxonomy:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TaxonomyError(f"taxonomy {path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError:
        raise TaxonomyError(f"taxonomy {path}: not valid YAML") from None
    try:
        return Taxonomy.model_validate(data)
    except ValidationError as exc:
        raise TaxonomyError(
            f"taxonomy {path}: {describe_validation_errors(exc.errors())}"
        ) from None


# --- /validate_domain ------------------------------------------------------------------------


def _key(text: str) -> str:
    """``"Computer  science"``, ``computer-science`` and COMPUTER_SCIENCE are one key."""
    return re.sub(r"[\s_\-]+", "_", text.strip()).upper()


def validate_domain(taxonomy: Taxonomy, given: str) -> ValidateDomainResponse:
    names: dict[str, str] = {}  # key of any spelling -> canonical name
    for domain in taxonomy.domains:
        for spelling in (domain.name, domain.label, *domain.aliases):
            names.setdefault(_key(spelling), domain.name)
    canonical = names.get(_key(given))
    if canonical is not None:
        return ValidateDomainResponse(domain=given, valid=True, canonical=canonical, suggestions=[])
    near = difflib.get_close_matches(_key(given), list(names), n=10, cutoff=0.6)
    suggestions = list(dict.fromkeys(names[key] for key in near))[:MAX_SUGGESTIONS]
    # A near miss with one clear answer ("COMPUTR SCIENCE") is that domain.
    close_one = suggestions[0] if len(suggestions) == 1 else None
    return ValidateDomainResponse(
        domain=given, valid=False, canonical=close_one, suggestions=suggestions
    )


# --- the prompt ------------------------------------------------------------------------------


def _record(fields: dict[str, Any]) -> str:
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":"))


def open_record(keys: PromptKeys, query: str, context_docs: Sequence[str] = ()) -> dict[str, Any]:
    """The query's record, before any label: its keys are the words the model reads."""
    record: dict[str, Any] = {keys.query: query}
    if context_docs:
        record[keys.context] = " | ".join(
            " ".join(doc.split())[:CONTEXT_DOC_PROMPT_CHARS] for doc in context_docs
        )
    return record


def field_prompt(record: dict[str, Any], key: str) -> str:
    """``record`` written up to the value of ``key``: ``{…,"key":``."""
    return _record(record)[:-1] + "," + json.dumps(key, ensure_ascii=False) + ":"
