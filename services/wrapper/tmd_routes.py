"""The TLC domain classifier's endpoints (DESIGN 3), served by wrappers with a taxonomy."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from schemas.tmd import (
    ClassifyDomainRequest,
    ClassifyDomainResponse,
    ExtractTmdRequest,
    ExtractTmdResponse,
    ValidateDomainRequest,
    ValidateDomainResponse,
)
from services.common.openapi import errors
from services.common.streaming import json_response
from services.common.strict_json import StrictJSONRoute
from services.wrapper.taxonomy import validate_domain
from services.wrapper.tmd import DomainClassifier

router = APIRouter(
    tags=["TLC domain classifier"], responses=errors(503), route_class=StrictJSONRoute
)


def classifier_of(request: Request) -> DomainClassifier:
    return request.app.state.classifier


@router.post(
    "/classify_domain",
    response_model=ClassifyDomainResponse,
    summary="The most likely domains of a query, with the model's probabilities",
)
async def classify_domain(body: ClassifyDomainRequest, request: Request) -> Response:
    answer = await classifier_of(request).classify_domain(body.query, body.top_k)
    return json_response(answer)


@router.post(
    "/extract_tmd",
    response_model=ExtractTmdResponse,
    summary="The task, method and domain of a query, with the model's probabilities",
)
async def extract_tmd(body: ExtractTmdRequest, request: Request) -> Response:
    answer = await classifier_of(request).extract_tmd(body.query, body.context_docs)
    return json_response(answer)


@router.post(
    "/validate_domain",
    response_model=ValidateDomainResponse,
    summary="Whether a domain name is in the taxonomy, its canonical form, suggestions",
)
async def validate(body: ValidateDomainRequest, request: Request) -> Response:
    answer = validate_domain(classifier_of(request).taxonomy, body.domain)
    # canonical is null for a domain outside the taxonomy: present, as the schema says.
    return json_response(answer, exclude_none=False)
