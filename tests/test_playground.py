"""The web playground at GET /, driven in a real browser (Debian's headless Chromium through Playwright).

Type a prompt, see the bars, click the top token, move the temperature, generate; at phone and desktop width.
Screenshots land in test-artifacts/playground-WIDTH.png."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from service.settings import Settings
from tests.support.live_server import LiveServer, make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        message = "Debian's chromium is not installed (`apt-get install chromium`; .ci/run does it)"
        if os.environ.get("LMSERVE_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)  # no browser on this machine, and not in CI: say so instead of failing
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    live = LiveServer(Settings(model=make_checkpoint(tmp_path_factory.mktemp("ckpt") / "playground"),
                               max_batch_size=4, max_seq_len=256)).wait_ready()
    yield live
    live.stop()


def bar_probs(page) -> list[float]:
    return [float(p) for p in page.locator(".bar").evaluate_all("els => els.map(e => e.dataset.prob)")]


def shown_percentages(page) -> list[str]:
    return page.locator(".bar-prob").all_inner_texts()


@pytest.mark.parametrize("width,height", [(1280, 900), (360, 740)])
def test_playground_bars_click_temperature_and_generate(browser, server, width, height):
    page = browser.new_page(viewport={"width": width, "height": height})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model-info').textContent.includes('parameters')")
    assert "cpu" in page.locator("#model-info").inner_text()

    page.fill("#top-k", "12")
    page.fill("#prompt", "def add(a, b):")
    page.wait_for_function("document.querySelectorAll('.bar').length === 12")
    probs = bar_probs(page)
    assert all(0 < p <= 1 for p in probs) and probs == sorted(probs, reverse=True)
    assert all(text.strip() for text in shown_percentages(page))
    title = page.locator(".bar").first.get_attribute("title")
    assert "prob" in title and "logprob" in title  # probability and logprob on hover

    top_text = page.locator(".bar").first.get_attribute("data-text")
    before = page.input_value("#prompt")
    page.locator(".bar").first.focus()
    page.keyboard.press("Enter")  # keyboard works as well as a click
    page.wait_for_function(f"document.getElementById('prompt').value.length === {len(before) + len(top_text)}")
    assert page.input_value("#prompt") == before + top_text
    page.wait_for_function("document.getElementById('entropy').textContent.length > 0")

    page.wait_for_timeout(300)
    cold = bar_probs(page)
    page.locator("#temperature").fill("0.3")  # a sharper distribution
    page.wait_for_function(f"document.querySelector('.bar').dataset.prob !== '{cold[0]}'")
    sharp = bar_probs(page)
    assert sharp[0] > cold[0] and sharp != cold

    page.fill("#max-new-tokens", "16")
    page.click("#generate")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('done')", timeout=20_000)
    assert page.locator("#completion").inner_text() != ""
    assert not errors and not page.locator("#error").is_visible()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"playground-{width}.png"), full_page=True)
    page.close()


def test_playground_shows_api_errors(browser, server):
    page = browser.new_page()
    page.goto(server.url + "/")
    page.wait_for_function("document.querySelectorAll('.bar').length > 0")
    page.fill("#max-new-tokens", "100000")  # beyond the context: the API says why, the page shows it
    page.click("#generate")
    page.wait_for_selector("#error.shown")
    assert "max_new_tokens" in page.locator("#error").inner_text()
    page.close()
