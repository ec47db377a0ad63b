"""The TLC domain classifier's API (DESIGN 3) and its Task-Method-Domain taxonomy."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

# A query is a search box's worth of text, not a document.
MAX_QUERY_CHARS = 2_000
MAX_CONTEXT_DOCS = 5
MAX_CONTEXT_DOC_CHARS = 4_000

Query = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_QUERY_CHARS)
]
LabelName = Annotated[str, StringConstraints(pattern=r"^[A-Z][A-Z0-9_]{0,63}$")]


# --- the taxonomy (config/tmd_taxonomy.yaml) -------------------------------------------------


class Label(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: LabelName = Field(description="The canonical label the API answers with.")
    label: str = Field(
        min_length=1, max_length=64, description="The words the model reads and writes."
    )
    aliases: tuple[str, ...] = ()


class LabelledQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    query: str = Field(min_length=1)
    context: str | None = None
    domain: str
    task: str
    method: str


class PromptKeys(BaseModel):
    """The keys of the query's record: the words the model reads before each value."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    query: str = Field(min_length=1)
    context: str = Field(min_length=1)
    domain: str = Field(min_length=1)
    task: str = Field(min_length=1)
    method: str = Field(min_length=1)

    @model_validator(mode="after")
    def _distinct(self) -> PromptKeys:
        keys = list(self.model_dump().values())
        if len(set(keys)) != len(keys):
            raise ValueError("every key must be different")
        return self


class Prompt(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str = Field(min_length=1)
    keys: PromptKeys


class Taxonomy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str = Field(min_length=1)
    domains: tuple[Label, ...] = Field(min_length=2)
    tasks: tuple[Label, ...] = Field(min_length=2)
    methods: tuple[Label, ...] = Field(min_length=2)
    prompt: Prompt
    calibration: tuple[LabelledQuery, ...] = Field(
        min_length=1,
        description="Queries over which the model's mean label distribution is its prior.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Taxonomy:
        for axis in ("domains", "tasks", "methods"):
            labels: tuple[Label, ...] = getattr(self, axis)
            for field in ("name", "label"):
                values = [getattr(label, field) for label in labels]
                if len(set(values)) != len(values):
                    raise ValueError(f"{axis}: every {field} must be unique")
        for n, example in enumerate(self.calibration):
            for axis, value in (
                ("domains", example.domain),
                ("tasks", example.task),
                ("methods", example.method),
            ):
                if value not in {label.label for label in getattr(self, axis)}:
                    raise ValueError(f"calibration[{n}]: {value!r} is not a label of {axis}")
        return self


# --- requests and answers ----------------------------------------------------------------


class ClassifyDomainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    query: Query
    top_k: int = Field(default=3, ge=1, description="1 to the number of domains.")


class DomainScore(BaseModel):
    domain: str
    confidence: float = Field(ge=0, le=1)


class ClassifyDomainResponse(BaseModel):
    query: str
    domains: list[DomainScore] = Field(description="Most likely first; confidences sum to ≤ 1.")
    primary_domain: str


class ExtractTmdRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    query: Query
    context_docs: list[Annotated[str, Field(max_length=MAX_CONTEXT_DOC_CHARS)]] = Field(
        default_factory=list, max_length=MAX_CONTEXT_DOCS
    )


class Tmd(BaseModel):
    task: str
    method: str
    domain: str


class TmdConfidence(BaseModel):
    task: float = Field(ge=0, le=1)
    method: float = Field(ge=0, le=1)
    domain: float = Field(ge=0, le=1)


class ExtractTmdResponse(BaseModel):
    query: str
    tmd: Tmd
    confidence: TmdConfidence


class ValidateDomainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    domain: str = Field(min_length=1, max_length=200)


class ValidateDomainResponse(BaseModel):
    domain: str
    valid: bool
    canonical: str | None = Field(description="The taxonomy's name for it, when it has one.")
    suggestions: list[str] = Field(description="Near names, most similar first, when not valid.")
