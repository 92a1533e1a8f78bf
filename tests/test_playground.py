"""The playground page at / in a real browser (Debian's chromium, headless) against a real
server serving `tiny`. Playwright never downloads a browser here: `make browser` installs
chromium, and without it these tests skip."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.conftest import ARTIFACTS, Server

CHROMIUM = Path(os.environ.get("CHARLSTM_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ACTIVE_ROWS = 'charlstm_active_rows{model="tiny"}'
CANCELLED = 'charlstm_requests_total{model="tiny",outcome="cancelled"}'

pytestmark = [
    pytest.mark.slow,  # a browser
    pytest.mark.skipif(
        not CHROMIUM.is_file(),
        reason=f"chromium not found at {CHROMIUM}: run `make browser` (or set CHARLSTM_CHROMIUM)",
    ),
]


# Generous: two shared cores, and a test run beside other test runs.
expect.set_options(timeout=60_000)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, server: Server) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    page.set_default_timeout(60_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{server.url}/")
    expect(page.locator("#generate")).to_be_enabled()  # models loaded
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def fill_form(page: Page, seed_text: str, max_chars: int, seed: str = "",
              temperature: str = "1") -> None:
    page.fill("#seed-text", seed_text)
    page.fill("#max-chars", str(max_chars))
    page.fill("#seed", seed)
    page.locator("#temperature").fill(temperature)


def metric(server: Server, series: str, missing: float | None = None) -> float:
    """The value of one series in /metrics; `missing` for a counter not incremented yet."""
    with server.client() as client:
        text = client.get("/metrics").text
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    if match is None and missing is not None:
        return missing
    assert match, f"no {series} in /metrics:\n{text[:3000]}"
    return float(match.group(1))


def generated_count(page: Page) -> int:
    return page.locator("#output .gen").count()


def test_page_loads_and_lists_the_default_model(page: Page) -> None:
    expect(page).to_have_title("charlstm playground")
    expect(page.locator("#model")).to_have_value("tiny")
    expect(page.locator("#model option")).to_have_text(["tiny"])
    expect(page.locator("#model-info")).to_contain_text("characters")
    assert page.locator("#temperature-marks option").evaluate_all(
        "options => options.map(o => Number(o.value))") == [0.2, 0.5, 1, 1.2]
    for label in ("Model", "Seed text", "Temperature", "Max characters", "Random seed"):
        expect(page.get_by_label(label, exact=True)).to_be_visible()


def test_generation_streams_in_then_shows_done(page: Page) -> None:
    fill_form(page, "ROMEO:\n", 2000, seed="1234567890123456789")
    # Record the generated length at each change of the output, with the page's state then.
    page.evaluate("""() => {
        window.growth = [];
        new MutationObserver(() => window.growth.push({
            n: document.querySelectorAll('#output .gen').length,
            state: document.getElementById('status').dataset.state,
        })).observe(document.getElementById('output'), {childList: true});
    }""")
    page.click("#generate")
    expect(page.locator("#status")).to_have_attribute("data-state", "done")

    growth: list[dict[str, Any]] = page.evaluate("window.growth")
    streamed = sorted({g["n"] for g in growth if g["state"] == "running" and g["n"] > 0})
    assert len(streamed) >= 3, f"text should arrive in several pieces, saw lengths {streamed}"
    assert streamed[0] < 2000
    assert generated_count(page) == 2000
    expect(page.locator("#output .seed")).to_have_text("ROMEO:\n")
    expect(page.locator("#stat-finish")).to_have_text(re.compile("^length"))
    expect(page.locator("#stat-chars")).to_have_text("2000")
    expect(page.locator("#stat-rate")).to_have_text(re.compile(r"^\d+$"))
    # 19 digits: past 2^53, so this checks the seed is never rounded through a JS number.
    expect(page.locator("#stat-seed")).to_have_text("1234567890123456789")
    expect(page.locator("#error")).to_be_hidden()


def test_continue_goes_on_exactly_as_one_longer_run(page: Page, server: Server) -> None:
    fill_form(page, "KING:", 120, seed="4242", temperature="0.8")
    expect(page.locator("#continue")).to_be_disabled()
    page.click("#generate")
    expect(page.locator("#status")).to_have_attribute("data-state", "done")
    expect(page.locator("#continue")).to_be_enabled()
    page.fill("#max-chars", "80")
    page.click("#continue")
    expect(page.locator("#stat-chars")).to_have_text("80")
    expect(page.locator("#status")).to_have_attribute("data-state", "done")
    assert generated_count(page) == 200
    shown = "".join(page.locator("#output .gen").all_text_contents())
    with server.client() as c:
        whole = c.post("/generate", json={"seed_text": "KING:", "max_new_chars": 200,
                                          "seed": 4242, "temperature": 0.8}).json()["text"]
    assert shown == whole
    expect(page.locator("#output .seed")).to_have_text("KING:")


def test_stop_cancels_a_long_generation(page: Page, server: Server) -> None:
    cancelled_before = metric(server, CANCELLED, missing=0)
    fill_form(page, "KING:\n", 5000)
    # `tiny` writes 5000 characters in well under a second, quicker than a round trip from
    # the test, so the page presses Stop itself as soon as 20 characters are in.
    page.evaluate("""() => new MutationObserver((_, observer) => {
        if (document.querySelectorAll('#output .gen').length >= 20) {
            observer.disconnect();
            document.getElementById('stop').click();
        }
    }).observe(document.getElementById('output'), {childList: true})""")
    page.click("#generate")

    expect(page.locator("#status")).to_have_attribute("data-state", "stopped")
    expect(page.locator("#status")).to_contain_text("Stopped after")
    expect(page.locator("#stat-finish")).to_have_text("stopped")
    expect(page.locator("#stat-seed")).to_have_text(re.compile(r"^\d+$"))
    expect(page.locator("#generate")).to_be_enabled()
    expect(page.locator("#stop")).to_be_disabled()
    stopped_at = generated_count(page)
    assert 20 <= stopped_at < 5000

    deadline = time.monotonic() + 10
    while (metric(server, ACTIVE_ROWS) != 0
           or metric(server, CANCELLED, missing=0) != cancelled_before + 1):
        assert time.monotonic() < deadline, "the server did not cancel the generation"
        time.sleep(0.1)
    time.sleep(0.3)
    assert generated_count(page) == stopped_at, "text kept arriving after Stop"


def test_shading_toggles_and_explains_each_character(page: Page) -> None:
    fill_form(page, "First Citizen:\n", 400, seed="7", temperature="0.5")
    page.click("#generate")
    expect(page.locator("#status")).to_have_attribute("data-state", "done")
    first = page.locator("#output .gen").first
    expect(page.locator("#legend")).to_be_hidden()
    assert first.evaluate("e => getComputedStyle(e).backgroundColor") == "rgba(0, 0, 0, 0)"

    page.get_by_label("Shade by probability").check()
    expect(page.locator("#output")).to_have_class(re.compile(r"\bshaded\b"))
    expect(page.locator("#legend")).to_be_visible()
    # Background alpha is 0.8 * (1 - p), so the less likely a character, the stronger it is.
    shades: list[list[float]] = page.locator("#output .gen").evaluate_all("""spans =>
        spans.map(s => [Number(s.style.getPropertyValue('--p')),
                        Number((getComputedStyle(s).backgroundColor.match(/[\\d.]+(?=\\))/)
                                || ['1'])[0])])""")
    assert len(shades) == 400
    for prob, alpha in shades:
        assert 0 <= prob <= 1
        assert alpha == pytest.approx(0.8 * (1 - prob), abs=0.01)
    assert len({round(p, 2) for p, _ in shades}) > 1
    tooltip = first.get_attribute("title") or ""
    assert re.search(r"p = [\d.]+%\ntop: ", tooltip), tooltip

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)

    page.get_by_label("Shade by probability").uncheck()
    expect(page.locator("#output")).not_to_have_class(re.compile(r"\bshaded\b"))
    assert first.evaluate("e => getComputedStyle(e).backgroundColor") == "rgba(0, 0, 0, 0)"


def test_api_errors_are_shown_to_the_user(page: Page) -> None:
    fill_form(page, "ROMEO:\n", 999_999)
    page.click("#generate")
    expect(page.locator("#status")).to_have_attribute("data-state", "error")
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_contain_text("max_new_chars must be in [1, 5000]")
    expect(page.locator("#error")).to_contain_text("HTTP 422")
    expect(page.locator("#generate")).to_be_enabled()


def test_the_constraint_box_constrains_the_text(page: Page) -> None:
    fill_form(page, "ROMEO:\n", 200, seed="3", temperature="1.2")
    expect(page.locator("#constraint")).to_be_disabled()
    page.select_option("#constraint-kind", "choice")
    page.fill("#constraint", "my lord|good night|farewell")
    page.click("#generate")
    expect(page.locator("#status")).to_have_attribute("data-state", "done")
    generated = "".join(page.locator("#output .gen").all_text_contents())
    assert generated in ("my lord", "good night", "farewell")
    expect(page.locator("#stat-finish")).to_have_text(re.compile("^stop"))
    page.select_option("#constraint-kind", "regex")
    page.fill("#constraint", "[A-Z][a-z]+( [a-z]+){2,4}\\.")
    page.click("#generate")
    expect(page.locator("#status")).to_have_attribute("data-state", "done")
    generated = "".join(page.locator("#output .gen").all_text_contents())
    assert re.fullmatch(r"[A-Z][a-z]+( [a-z]+){2,4}\.", generated), generated


def test_layout_fits_a_phone_screen(page: Page) -> None:
    page.set_viewport_size({"width": 390, "height": 844})
    fill_form(page, "ROMEO:\n", 300, seed="7", temperature="0.5")
    page.click("#generate")
    expect(page.locator("#status")).to_have_attribute("data-state", "done")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    form = page.locator("#controls").bounding_box()
    result = page.locator(".result").bounding_box()
    assert form is not None
    assert result is not None
    assert result["y"] >= form["y"] + form["height"], "the output should stack under the form"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground-mobile.png"), full_page=True)
