"""The status page (`GET /ui`) in a real headless Chromium against a running cluster: a
gateway with the admin key, a one-slot worker serving a generated demo model slow enough
to hold its slot, and an embedding worker. Nothing without a key; a user key watches
read-only; the admin sees a queued request's position and ETA, ejects the demo model with
the keyboard (its button keeps the focus while the page updates) and sees it turn off
without a reload; screenshots at desktop and phone width are saved under
the test's tmp dir. Then a page whose Redis, and then whose gateway, goes away says so."""

from __future__ import annotations

import io
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver

from corral.redis_server import EmbeddedRedis
from corral.tinymodel import make_model
from tests.conftest import Cluster, start_cluster
from tests.gateway.helpers import ADMIN_KEY, add_key, bearer, drop_keys, start_gateway
from tests.gateway.ui.browser import chromium, needs_chromium, phone_width
from tests.support import Blocker, openai_client, slow_model, wait_for

pytestmark = [pytest.mark.slow, needs_chromium]

DEMO, EMBED = "corral-demo", "corral-demo-embed"
ETA = re.compile(r"^#1 · (starts in ~\S+ \S+|due now)$")


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with EmbeddedRedis() as server:  # its own: the page shows this cluster alone
        yield server.url


@pytest.fixture(scope="module")
def demo(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("ui-cluster")
    chat = slow_model(root / f"{DEMO}.gguf")
    embed = make_model(root / f"{EMBED}.gguf", embedding=True)
    cluster = start_cluster(
        redis_url,
        root / "logs",
        [
            ["--model", str(chat), "--slots", "1", "--ctx-size", "16384"],
            ["--model", str(embed), "--embedding"],
        ],
        CORRAL_ADMIN_KEY=ADMIN_KEY,
    )
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    with chromium(tmp_path_factory.mktemp("chromium-profile")) as driver:
        yield driver


def open_page(driver: WebDriver, base_url: str, key: str | None = None) -> None:
    """The page from `/`, with nothing kept from an earlier test; then `key` typed in."""
    driver.get(f"{base_url}/")
    driver.execute_script("sessionStorage.clear()")
    driver.refresh()
    assert driver.current_url == f"{base_url}/ui"
    if key is not None:
        driver.find_element(By.ID, "key").send_keys(key)
        driver.find_element(By.CSS_SELECTOR, "#key-form button[type=submit]").click()


def text(driver: WebDriver, css: str) -> str:
    """The text of the first element matching `css`; "" if none (or it just went away)."""
    try:
        found = driver.find_elements(By.CSS_SELECTOR, css)
        return str(found[0].text) if found else ""
    except WebDriverException:
        return ""


def status_on_page(driver: WebDriver, model: str) -> str:
    return text(driver, f'#models tr[data-model="{model}"] [data-col="status"]')


def until(check: object, what: str, timeout: float = 30) -> None:
    assert callable(check)
    assert wait_for(check, timeout, interval=0.05), what


def test_without_a_key_the_page_shows_nothing(demo: Cluster, browser: WebDriver) -> None:
    base = demo.base_url
    page = httpx.get(f"{base}/ui")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert httpx.get(f"{base}/ui/static/app.js").status_code == 200
    assert httpx.get(f"{base}/ui/static/nope.js").status_code == 404
    assert httpx.get(f"{base}/").headers["location"] == "/ui"
    stream = f"{base}/v1/models/status/stream?cluster=true"
    assert httpx.get(stream).status_code == 401

    open_page(browser, base)
    until(lambda: text(browser, "#conn") == "Key needed", "the page never asked for a key")
    assert "API key" in text(browser, "#banner")
    assert browser.find_elements(By.CSS_SELECTOR, "#models tbody tr") == []
    assert browser.find_elements(By.CSS_SELECTOR, "#workers tbody tr") == []


def test_a_user_key_watches_read_only(demo: Cluster, browser: WebDriver, redis_url: str) -> None:
    _, secret = add_key(redis_url, "viewer")
    try:
        open_page(browser, demo.base_url, secret)
        until(lambda: status_on_page(browser, DEMO) == "ready", "the demo model never showed")
        assert "user" in text(browser, "#viewer") and "viewer" in text(browser, "#viewer")
        buttons = browser.find_elements(By.CSS_SELECTOR, "button[data-action]")
        assert buttons and not any(b.is_displayed() for b in buttons)
        eject = httpx.post(
            f"{demo.base_url}/v1/models/eject", json={"model": DEMO}, headers=bearer(secret)
        )
        assert eject.status_code == 403
        assert httpx.get(f"{demo.base_url}/v1/telemetry", headers=bearer(secret)).status_code == 403
    finally:
        drop_keys(redis_url)


def test_the_admin_watches_the_queue_and_ejects_live(
    demo: Cluster, browser: WebDriver, tmp_path: Path
) -> None:
    base, admin = demo.base_url, bearer(ADMIN_KEY)
    client = openai_client(f"{base}/v1", ADMIN_KEY)
    for _ in range(3):  # served requests: the model's speed and service time
        client.chat.completions.create(
            model=DEMO, messages=[{"role": "user", "content": "hi"}], max_tokens=16
        )
    _embedding_batch(client)

    open_page(browser, base, ADMIN_KEY)
    until(lambda: status_on_page(browser, DEMO) == "ready", "the demo model never showed ready")
    assert "admin" in text(browser, "#viewer") and text(browser, "#conn") == "Live"
    speed = f'#models tr[data-model="{DEMO}"] td:nth-child(5)'
    until(lambda: "·" in text(browser, speed), "no tokens/s shown")

    with Blocker(base, DEMO, key=ADMIN_KEY):
        queued = threading.Thread(target=_one_request, args=(base,), daemon=True)
        queued.start()
        eta = 'tr[data-state="queued"] [data-col="eta"]'
        until(lambda: ETA.match(text(browser, eta)) is not None, "no position and ETA shown")
        request_id = browser.find_element(By.CSS_SELECTOR, 'tr[data-state="queued"]')
        record = httpx.get(
            f"{base}/v1/requests/{request_id.get_attribute('data-request')}", headers=admin
        ).json()
        assert record["position"] == 1 and record["estimated_start_at"] > record["enqueued_at"]
        _screenshots(browser, tmp_path)
    queued.join(30)

    browser.execute_script("window.corralNoReload = true")
    eject = browser.find_element(By.CSS_SELECTOR, f'button[aria-label="Eject {DEMO}"]')
    browser.execute_script("arguments[0].focus()", eject)
    time.sleep(1.5)  # snapshots come and go (the queued request ended): the focus stays
    assert browser.switch_to.active_element == eject
    eject.send_keys(Keys.ENTER)  # by keyboard
    browser.switch_to.alert.accept()
    api_off, page_off = _when_off(browser, base)
    assert page_off - api_off <= 1.0, f"page off {page_off - api_off:.2f} s after the API"
    assert browser.execute_script("return window.corralNoReload") is True  # no reload


def test_the_page_tells_redis_from_the_gateway_going_away(
    browser: WebDriver, tmp_path: Path
) -> None:
    with EmbeddedRedis() as server:
        gateway = start_gateway(server.url, tmp_path / "logs")  # open: loopback, no keys
        try:
            open_page(browser, gateway.base_url)
            until(lambda: text(browser, "#conn") == "Live", "the page never went live")
            assert "anyone" in text(browser, "#viewer")
            server.stop()
            until(lambda: text(browser, "#conn") == "Redis unreachable", "Redis loss not shown")
            assert "Redis" in text(browser, "#banner")
        finally:
            gateway.stop()
        until(lambda: text(browser, "#conn") == "Gateway unreachable", "gateway loss not shown")
        assert "gateway" in text(browser, "#banner")
        stale = browser.find_element(By.ID, "main").get_attribute("class") or ""
        assert "stale" in stale


def _one_request(base_url: str) -> None:
    body = {"model": DEMO, "messages": [{"role": "user", "content": "queued"}], "max_tokens": 8}
    httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=bearer(ADMIN_KEY), timeout=60)


def _embedding_batch(client: openai.OpenAI) -> None:
    """A small batch on the embedding model, done before the page opens (its progress)."""
    lines = [
        {"custom_id": f"c{i}", "method": "POST", "url": "/v1/embeddings"}
        | {"body": {"model": EMBED, "input": f"line {i}"}}
        for i in range(4)
    ]
    data = "\n".join(json.dumps(line) for line in lines).encode()
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h"
    )
    until(lambda: client.batches.retrieve(batch.id).status == "completed", "the batch never ended")


def _screenshots(driver: WebDriver, where: Path) -> None:
    """The page at desktop and at phone width, as test artifacts."""
    desktop, phone = where / "status-desktop.png", where / "status-phone.png"
    assert driver.save_screenshot(str(desktop))
    phone_width(driver, True)
    try:
        time.sleep(0.3)  # the new layout painted
        assert driver.save_screenshot(str(phone))
    finally:
        phone_width(driver, False)
    print(f"screenshots: {desktop} {phone}")
    assert desktop.stat().st_size > 10_000 and phone.stat().st_size > 10_000


def _when_off(driver: WebDriver, base_url: str) -> tuple[float, float]:
    """When the API, then the page, first showed the demo model off (monotonic s)."""
    api_off = page_off = None
    deadline = time.monotonic() + 30
    while (api_off is None or page_off is None) and time.monotonic() < deadline:
        if api_off is None:
            r = httpx.get(f"{base_url}/v1/models/{DEMO}/status", headers=bearer(ADMIN_KEY))
            if r.json()["status"] == "off":
                api_off = time.monotonic()
        if page_off is None and status_on_page(driver, DEMO) == "off":
            page_off = time.monotonic()
        time.sleep(0.02)
    assert api_off is not None and page_off is not None, "the demo model never turned off"
    return api_off, page_off
