"""The TLC domain classifier: the taxonomy, domain validation, confidences from the
logprobs of a constrained generation, and the endpoints (the Ollama edge mocked with a
recorded answer of the embedded classifier)."""

from __future__ import annotations

import json
import math

import httpx
import pytest

from schemas import ollama as api
from schemas.tmd import MAX_CONTEXT_DOCS
from scripts.eval_tmd import evaluate, load_eval_set
from services.wrapper.settings import WrapperSettings
from services.wrapper.taxonomy import load_taxonomy, validate_domain
from services.wrapper.tmd import label_probabilities
from tests.conftest import DATA, REPO, Daemons, free_port, make_settings, sent_json, streamed

pytestmark = pytest.mark.anyio

TAXONOMY = REPO / "config" / "tmd_taxonomy.yaml"
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


def tmd_lines(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / "tmd" / name).read_text().splitlines() if line]


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


def test_the_evaluation_set_covers_the_domains_and_stays_out_of_the_prompt(taxonomy):
    cases = [json.loads(line) for line in (DATA / "tmd_eval.jsonl").read_text().splitlines()]
    assert len(cases) >= 100
    assert {case["domain"] for case in cases} == set(SPEC_DOMAINS) - {"OTHER", "FACTOIDWIKI"}
    examples = {example.query.casefold() for example in taxonomy.prompt.examples}
    assert not examples & {case["query"].casefold() for case in cases}


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
    """The embedded classifier on the README's query: '"', "medicine", '"'."""
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


# --- the endpoints ---------------------------------------------------------------------------


def tlc_settings(**changes) -> WrapperSettings:
    return make_settings(
        service="tlc_domain_classifier",
        agent_id="tlc_domain_classifier",
        name="TLC domain classifier",
        role="domain_classifier",
        capabilities=["domain_classification", "tmd_extraction", "domain_validation"],
        prompt_style="completion",
        max_tokens_limit=16,
        taxonomy=TAXONOMY,
        **changes,
    )


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
    # the raw few-shot prompt ending where the domain's value starts.
    sent = sent_json(route)
    assert sent["format"]["enum"] == [domain.label for domain in taxonomy.domains]
    assert (sent["raw"], sent["stream"], sent["logprobs"], sent["top_logprobs"]) == (
        True,
        True,
        True,
        20,
    )
    assert sent["options"]["temperature"] == 0
    assert sent["prompt"].endswith('{"query":' + json.dumps(QUERY) + ',"domain":')
    assert sent["prompt"].startswith(taxonomy.prompt.header)


async def test_extract_tmd_decides_each_axis_on_the_previous_ones(tlc, backend):
    def answer(request: httpx.Request) -> httpx.Response:
        field = json.loads(request.content)["prompt"].rsplit(",", 1)[-1]
        return streamed(tmd_lines(f"generate_stream_{field.strip(':').strip(chr(34))}.ndjson"))

    route = backend.post("/api/generate").mock(side_effect=answer)
    docs = ["Insulin lets cells take up glucose; in diabetes   that fails."]
    response = await tlc.http.post("/extract_tmd", json={"query": QUERY, "context_docs": docs})
    assert response.status_code == 200, response.text
    answer_ = response.json()
    assert answer_["tmd"] == {"task": "ANSWER", "method": "GRAPH", "domain": "MEDICINE"}
    assert all(0 < p <= 1 for p in answer_["confidence"].values())
    prompts = [json.loads(call.request.content)["prompt"] for call in route.calls]
    assert len(prompts) == 3
    assert prompts[1].startswith(prompts[0])  # each extends the last: the cache holds
    assert prompts[2].endswith('"domain":"medicine","task":"answer","method":')
    assert '"context":"Insulin lets cells take up glucose; in diabetes that fails."' in prompts[0]


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

# Floors for a regression to trip, below what the evaluation measures (scripts/bench/README.md);
# the whole set and the targets are scripts/eval_tmd.py's job.
SUBSET_EVERY = 3
FLOOR_TOP1, FLOOR_TOP3 = 0.70, 0.90


@pytest.fixture(scope="module")
def tlc_chain(tmp_path_factory):
    ports = {name: free_port() for name in ("host", "classifier", "tlc")}
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
    """What the contract promises of a real answer; which domain it is, is the model's call
    (floating point differs between CPUs) and the evaluation's measure."""
    url = tlc_chain.urls["tlc"]
    answer = httpx.post(f"{url}/classify_domain", json={"query": QUERY}, timeout=120).json()
    domains = [d["domain"] for d in answer["domains"]]
    confidences = [d["confidence"] for d in answer["domains"]]
    assert len(domains) == len(set(domains)) == 3  # top_k's default
    assert set(domains) <= {domain.name for domain in taxonomy.domains}
    assert answer["primary_domain"] == domains[0]
    assert confidences == sorted(confidences, reverse=True)
    assert 0 < sum(confidences) <= 1 + 1e-6
    tmd = httpx.post(f"{url}/extract_tmd", json={"query": QUERY}, timeout=120).json()
    assert tmd["tmd"]["domain"] in {domain.name for domain in taxonomy.domains}
    assert tmd["tmd"]["task"] in {task.name for task in taxonomy.tasks}
    assert tmd["tmd"]["method"] in {method.name for method in taxonomy.methods}
    assert all(0 < p <= 1 for p in tmd["confidence"].values())
