"""The TLC domain classifier: the taxonomy, domain validation, confidences from the
logprobs of a constrained generation and their calibration, and the endpoints (the Ollama
edge mocked with recorded answers of the embedded classifier)."""

from __future__ import annotations

import json
import math

import httpx
import pytest

from schemas import ollama as api
from schemas.tmd import MAX_CONTEXT_DOCS
from scripts.bench.eval_tmd import evaluate, load_eval_set
from services.wrapper.taxonomy import load_taxonomy, validate_domain
from services.wrapper.tmd import DECIDING_TOKENS, calibrate, label_prior, label_probabilities
from tests.conftest import (
    DATA,
    TAXONOMY,
    Daemons,
    free_port,
    make_settings,
    port_map,
    recorded_answer,
    sent_json,
    split_prompt,
    streamed,
    tlc_settings,
    tmd_lines,
)

pytestmark = pytest.mark.anyio

SPEC_DOMAINS = [
    "FACTOIDWIKI",
    "ARTIFICIAL_INTELLIGENCE",
    "MEDICINE",
    "BIOLOGY",
    "PHYSICS",
    "CHEMISTRY",
    "MATHEMATICS",
    "COMPUTER_SCIENCE",
    "ENGINEERING",
    "HISTORY",
    "LITERATURE",
    "PHILOSOPHY",
    "LAW",
    "ECONOMICS",
    "BUSINESS",
    "PSYCHOLOGY",
    "SOCIOLOGY",
    "GEOGRAPHY",
    "SPORTS",
    "ENTERTAINMENT",
    "OTHER",
]
QUERY = "What is the role of glucose in diabetes?"  # the README's example


@pytest.fixture(scope="module")
def taxonomy():
    return load_taxonomy(TAXONOMY)


def steps_of(lines: list[dict]) -> list[api.Logprob]:
    return [api.Logprob.model_validate(step) for line in lines for step in line.get("logprobs", ())]


# --- the taxonomy ----------------------------------------------------------------------------


def test_the_taxonomy_has_the_domains_of_the_spec(taxonomy):
    assert [domain.name for domain in taxonomy.domains] == SPEC_DOMAINS
    assert {"ANSWER", "EXPLAIN"} <= {task.name for task in taxonomy.tasks}
    assert {"DENSE", "SPARSE", "HYBRID"} <= {method.name for method in taxonomy.methods}


def test_the_evaluation_set_covers_the_domains_and_stays_out_of_the_calibration(taxonomy):
    cases = [json.loads(line) for line in (DATA / "tmd_eval.jsonl").read_text().splitlines()]
    assert len(cases) >= 100
    assert {case["domain"] for case in cases} == set(SPEC_DOMAINS) - {"OTHER", "FACTOIDWIKI"}
    calibration = {example.query.casefold() for example in taxonomy.calibration}
    assert not calibration & {case["query"].casefold() for case in cases}


def test_a_taxonomy_with_an_unknown_example_label_stops_the_start_up(tmp_path):
    broken = TAXONOMY.read_text().replace("domain: medicine,", "domain: medicin,", 1)
    (tmp_path / "tmd.yaml").write_text(broken)
    with pytest.raises(ValueError, match="'medicin' is not a label of domains"):
        make_settings(taxonomy=tmp_path / "tmd.yaml")


@pytest.mark.parametrize(
    ("given", "valid", "canonical"),
    [
        ("COMPUTER_SCIENCE", True, "COMPUTER_SCIENCE"),
        ("computer science", True, "COMPUTER_SCIENCE"),
        ("  Computer   Science ", True, "COMPUTER_SCIENCE"),
        ("computer-science", True, "COMPUTER_SCIENCE"),
        ("AI", True, "ARTIFICIAL_INTELLIGENCE"),
        ("medcine", False, "MEDICINE"),
        ("Phylosophy", False, "PHILOSOPHY"),
        ("quantum knitting", False, None),
    ],
)
def test_domain_names_are_validated_and_corrected(taxonomy, given, valid, canonical):
    answer = validate_domain(taxonomy, given)
    assert (answer.domain, answer.valid, answer.canonical) == (given, valid, canonical)
    if valid:
        assert answer.suggestions == []
    elif canonical:
        assert answer.suggestions[0] == canonical


# --- confidences -----------------------------------------------------------------------------


def test_confidences_follow_the_recorded_logprobs(taxonomy):
    """The embedded classifier on the README's query: '"', then "medicine"."""
    words = [domain.label for domain in taxonomy.domains]
    steps = steps_of(tmd_lines("generate_stream_domain.ndjson"))
    scores = label_probabilities(words, steps)
    assert max(scores, key=scores.get) == "medicine"
    assert sum(scores.values()) == pytest.approx(1.0)
    assert scores["sports"] == 0  # in no step's top logprobs
    # '"' is the only way a JSON string starts, so the label word's step decides "biology":
    # its weight among the tokens that begin some label.
    opening = [t for t in steps[1].top_logprobs if any(w.startswith(t.token) for w in words)]
    weight = {t.token: math.exp(t.logprob) for t in opening}
    # "bi" is another way to start "biology" (and only it): its share counts too.
    expected = (weight["biology"] + weight["bi"]) / sum(weight.values())
    assert scores["biology"] == pytest.approx(expected)


def step(token: str, logprob: float, *alternatives: tuple[str, float]) -> api.Logprob:
    tops = [api.TokenLogprob(token=t, logprob=lp) for t, lp in alternatives]
    return api.Logprob(token=token, logprob=logprob, top_logprobs=tops)


def test_confidences_split_where_the_labels_part():
    labels = ["law", "lawn care", "literature"]
    steps = [
        step('"', -0.1, ('"', -0.1), (' "', -1.0)),  # ' "' leads nowhere: dropped
        step("law", -1.0, ("law", -1.0), ("lit", -1.0), ("hello", -0.5)),
        step('"', -0.5, ('"', -0.5), ("n", -0.5)),
    ]
    scores = label_probabilities(labels, steps)
    assert scores["literature"] == pytest.approx(0.5)
    assert scores["law"] == pytest.approx(0.25)
    assert scores["lawn care"] == pytest.approx(0.25)


def test_a_chosen_token_missing_from_its_top_logprobs_still_counts():
    labels = ["physics", "philosophy"]
    steps = [step('"', 0.0), step("phys", -3.0, ("phil", -1.0), ("hello", -0.1))]
    scores = label_probabilities(labels, steps)
    assert scores["philosophy"] > scores["physics"] > 0
    assert sum(scores.values()) == pytest.approx(1.0)


def test_calibration_divides_out_what_the_model_favours_whatever_the_query():
    labels = ["mathematics", "physics", "geography"]
    # The model leans to mathematics on every calibration query, never says geography.
    rows = [{"mathematics": 0.7, "physics": 0.3, "geography": 0.0}] * 9
    model_prior = label_prior(rows, labels)
    assert model_prior["geography"] > 0  # rare, not impossible
    assert sum(model_prior.values()) == pytest.approx(1.0)
    scores = {"mathematics": 0.5, "physics": 0.4, "geography": 0.0}
    calibrated = calibrate(scores, model_prior)
    assert calibrated["physics"] > calibrated["mathematics"]  # less than its usual lean
    assert calibrated["geography"] == 0
    assert sum(calibrated.values()) == pytest.approx(sum(scores.values()))


def test_a_uniform_prior_changes_nothing():
    scores = {"law": 0.6, "literature": 0.3, "history": 0.05}
    assert calibrate(scores, dict.fromkeys(scores, 1 / 3)) == pytest.approx(scores)


# --- the endpoints ---------------------------------------------------------------------------


@pytest.fixture
async def tlc(start_wrapper):
    return await start_wrapper(tlc_settings())


async def test_classify_domain_answers_top_k_with_the_models_probabilities(tlc, backend, taxonomy):
    route = backend.post("/api/generate").mock(
        side_effect=lambda _: streamed(tmd_lines("generate_stream_domain.ndjson"))
    )
    response = await tlc.http.post("/classify_domain", json={"query": QUERY, "top_k": 3})
    assert response.status_code == 200
    answer = response.json()
    assert answer["query"] == QUERY
    assert answer["primary_domain"] == "MEDICINE"
    confidences = [d["confidence"] for d in answer["domains"]]
    assert len(confidences) == 3
    assert confidences == sorted(confidences, reverse=True)
    assert answer["domains"][0]["domain"] == "MEDICINE"
    assert 0 < sum(confidences) <= 1
    # What the backend was asked: the labels as a JSON schema enum, greedy, with logprobs,
    # two tokens, the raw prompt the query's record ending where the domain's value starts.
    sent = sent_json(route)
    assert sent["format"]["enum"] == [domain.label for domain in taxonomy.domains]
    assert (sent["raw"], sent["stream"], sent["logprobs"], sent["top_logprobs"]) == (
        True,
        True,
        True,
        20,
    )
    assert sent["options"] == {"temperature": 0, "num_predict": DECIDING_TOKENS}
    keys = taxonomy.prompt.keys
    assert (
        sent["prompt"]
        == "{" + f"{json.dumps(keys.query)}:{json.dumps(QUERY)},{json.dumps(keys.domain)}:"
    )


async def test_the_prior_is_measured_once_on_the_calibration_queries(tlc, backend, taxonomy):
    route = backend.post("/api/generate").mock(
        side_effect=lambda _: streamed(tmd_lines("generate_stream_domain.ndjson"))
    )
    await tlc.http.post("/classify_domain", json={"query": QUERY})
    prompts = [json.loads(call.request.content)["prompt"] for call in route.calls]
    calibration = [example.query for example in taxonomy.calibration]
    asked = [split_prompt(prompt)[0][taxonomy.prompt.keys.query] for prompt in prompts]
    assert asked == [*calibration, QUERY]
    await tlc.http.post("/classify_domain", json={"query": "Who wrote Hamlet?"})
    assert route.call_count == len(calibration) + 2


def label_stream(*tokens: str, done_reason: str) -> list[dict]:
    """A constrained generation's NDJSON: each token certain, then the last answer."""
    lines = [
        {
            "model": "gemma3:270m",
            "created_at": "2026-11-29T00:00:00Z",
            "response": token,
            "done": False,
            "logprobs": [{"token": token, "logprob": 0.0, "top_logprobs": []}],
        }
        for token in tokens
    ]
    last = {"model": "gemma3:270m", "created_at": "2026-11-29T00:00:00Z", "response": ""}
    return [*lines, last | {"done": True, "done_reason": done_reason, "prompt_eval_count": 12}]


async def test_a_label_the_deciding_tokens_leave_open_is_asked_again_to_its_end(tlc, backend):
    """gemma writes geography as "ge" + "ography": "ge" may still become general knowledge."""

    def answer(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content)["options"]["num_predict"] == DECIDING_TOKENS:
            return streamed(label_stream('"', "ge", done_reason="length"))
        return streamed(label_stream('"', "ge", "ography", '"', done_reason="stop"))

    route = backend.post("/api/generate").mock(side_effect=answer)
    response = await tlc.http.post("/classify_domain", json={"query": "Where is Lake Baikal?"})
    assert response.json()["primary_domain"] == "GEOGRAPHY"
    *_, asked, again = [json.loads(call.request.content) for call in route.calls]
    assert asked["prompt"] == again["prompt"]
    assert (asked["options"]["num_predict"], again["options"]["num_predict"]) == (2, 16)


async def test_extract_tmd_decides_each_axis_on_the_previous_ones(tlc, backend, taxonomy):
    keys = taxonomy.prompt.keys
    route = backend.post("/api/generate").mock(side_effect=recorded_answer)
    docs = ["Insulin lets cells take up glucose; in diabetes   that fails."]
    response = await tlc.http.post("/extract_tmd", json={"query": QUERY, "context_docs": docs})
    assert response.status_code == 200, response.text
    answer_ = response.json()
    assert answer_["tmd"] == {"task": "ANSWER", "method": "DENSE", "domain": "MEDICINE"}
    assert all(0 < p <= 1 for p in answer_["confidence"].values())
    prompts = [json.loads(call.request.content)["prompt"] for call in route.calls]
    prompts = [prompt for prompt in prompts if json.dumps(QUERY) in prompt]  # not calibration
    assert len(prompts) == 4  # the method's twice: '"d' leaves it open
    prompts = list(dict.fromkeys(prompts))
    assert prompts[1].startswith(prompts[0][:-1])  # each extends the last
    assert prompts[2].endswith(
        f'{json.dumps(keys.domain)}:"medicine",{json.dumps(keys.task)}:"answer",'
        f"{json.dumps(keys.method)}:"
    )
    context = "Insulin lets cells take up glucose; in diabetes that fails."
    assert f"{json.dumps(keys.context)}:{json.dumps(context)}" in prompts[0]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/classify_domain", {"query": QUERY, "top_k": 0}, "top_k"),
        ("/classify_domain", {"query": QUERY, "top_k": 22}, "top_k"),
        ("/classify_domain", {"query": "   "}, "query"),
        ("/classify_domain", {"query": "x" * 2_001}, "query"),
        ("/extract_tmd", {"query": QUERY, "context_docs": ["d"] * (MAX_CONTEXT_DOCS + 1)}, ""),
        ("/extract_tmd", {"query": QUERY, "context_docs": ["d" * 4_001]}, "context_docs"),
        ("/validate_domain", {"domain": ""}, "domain"),
    ],
)
async def test_bad_input_is_a_422_envelope(tlc, backend, path, body, param):
    route = backend.post("/api/generate")
    response = await tlc.http.post(path, json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert (error["param"] or "").startswith(param)
    assert not route.called


async def test_validate_domain_needs_no_backend(tlc, backend):
    backend.get("/api/tags").mock(side_effect=httpx.ConnectError("refused"))
    response = await tlc.http.post("/validate_domain", json={"domain": "computer science"})
    assert response.json() == {
        "domain": "computer science",
        "valid": True,
        "canonical": "COMPUTER_SCIENCE",
        "suggestions": [],
    }


async def test_validate_domain_answers_canonical_null_for_a_domain_outside_the_taxonomy(tlc):
    # Issue 13: canonical, which the schema requires, was left out.
    response = await tlc.http.post("/validate_domain", json={"domain": "astrology"})
    answer = response.json()
    assert (answer["valid"], answer["canonical"]) == (False, None)


async def test_a_down_backend_is_503_and_degraded_health(tlc, backend):
    backend.get("/api/tags").mock(side_effect=httpx.ConnectError("refused"))
    backend.post("/api/generate").mock(side_effect=httpx.ConnectError("refused"))
    response = await tlc.http.post("/classify_domain", json={"query": QUERY})
    assert response.status_code == 503
    assert "unreachable" in response.json()["error"]["message"]
    health = await tlc.http.get("/health")
    assert (health.status_code, health.json()["status"]) == (503, "degraded")


async def test_a_backend_without_logprobs_is_a_clear_503(tlc, backend):
    """An Ollama older than logprobs answers without them: no confidence can be made up."""
    lines = [
        {k: v for k, v in line.items() if k != "logprobs"}
        for line in tmd_lines("generate_stream_domain.ndjson")
    ]
    backend.post("/api/generate").mock(side_effect=lambda _: streamed(lines))
    response = await tlc.http.post("/classify_domain", json={"query": QUERY})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "backend_no_logprobs"


async def test_info_reports_the_taxonomy_and_prompt_versions(tlc, backend, taxonomy):
    info = (await tlc.http.get("/info")).json()
    assert info["domain_taxonomy_version"] == taxonomy.version
    assert info["prompt_version"] == taxonomy.prompt.version
    assert {"/classify_domain", "/extract_tmd", "/validate_domain"} <= set(info["endpoints"])


# --- the real chain: embedded Gemma 3 host, classifier wrapper, TLC wrapper --------------

# Floors for a regression to trip, below what the evaluation measures (the benchmarks page,
# scripts/bench/README.md); the whole set and the targets are scripts/bench/eval_tmd.py's job.
SUBSET_EVERY = 3
FLOOR_TOP1, FLOOR_TOP3 = 0.70, 0.85


@pytest.fixture(scope="module")
def tlc_chain(tmp_path_factory):
    ports = port_map("host", "classifier", "tlc")
    daemons = Daemons(
        tmp_path_factory.mktemp("tlc"),
        SWARM_REGISTRY__PORT=str(free_port()),  # none: the wrappers retry in the background
        SWARM_BACKENDS__GEMMA3__PORT=str(ports["host"]),
        SWARM_WRAPPERS__CLASSIFIER__PORT=str(ports["classifier"]),
        SWARM_WRAPPERS__TLC_DOMAIN_CLASSIFIER__PORT=str(ports["tlc"]),
    )
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    try:
        daemons.start(
            "host",
            "services.modelhost",
            "--backend",
            "gemma3",
            url=urls["host"],
            health="/api/version",
        )
        daemons.start("classifier", "services", "classifier", url=urls["classifier"])
        daemons.start("tlc", "services", "tlc_domain_classifier", url=urls["tlc"])
        daemons.urls = urls
        yield daemons
    finally:
        daemons.kill_all()


@pytest.mark.process
def test_the_embedded_classifier_stays_above_its_floor(tlc_chain):
    cases = load_eval_set()[::SUBSET_EVERY]
    figures = evaluate(tlc_chain.urls["tlc"], cases, timeout=120)
    assert figures["top1"] >= FLOOR_TOP1, figures["misses_by_domain"]
    assert figures["top3"] >= FLOOR_TOP3, figures["misses_by_domain"]


@pytest.mark.process
def test_the_readme_example_through_the_real_chain(tlc_chain, taxonomy):
    query = "What is the role of glucose in diabetes?"
    url = tlc_chain.urls["tlc"]
    answer = httpx.post(f"{url}/classify_domain", json={"query": query}, timeout=120).json()
    names = [domain.name for domain in taxonomy.domains]
    ranked = [d["domain"] for d in answer["domains"]]
    confidences = [d["confidence"] for d in answer["domains"]]
    assert answer["primary_domain"] == ranked[0]
    assert set(ranked) <= set(names)
    assert confidences == sorted(confidences, reverse=True)
    assert 0 < sum(confidences) <= 1
    tmd = httpx.post(f"{url}/extract_tmd", json={"query": query}, timeout=120).json()
    # The same record asks for the domain on both paths: the same answer (its confidence
    # within rounding: the second prompt is mostly read from the host's cache).
    assert tmd["tmd"]["domain"] == answer["primary_domain"]
    assert tmd["confidence"]["domain"] == pytest.approx(confidences[0], rel=0.05)
    assert all(0 < p <= 1 for p in tmd["confidence"].values())
    # What the backend read from its prompt cache reaches the TLC's /info.
    cache = httpx.get(f"{url}/info", timeout=10).json()["prompt_cache"]
    assert cache["calls"] > 0
    assert cache["calls"] == cache["calls_reporting"]
