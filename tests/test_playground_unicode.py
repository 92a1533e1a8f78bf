"""The playground on any text, in a real browser (Debian's chromium) against a real server on the
unicode model (tests/modelgen.py): one element per grapheme cluster, each shaded by the product
of its code points' probabilities and wide enough to hover, controls drawn as their names (NUL,
ESC, BEL, CR, LS), and no request the server answers with 404 (the favicon)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import regex
from playwright.sync_api import Browser, Page, Response, expect

from tests.conftest import ARTIFACTS, Server, start_server, stop_server
from tests.test_playground import CHROMIUM, browser, fill_form

__all__ = ["browser"]  # the module-scoped fixture, shared with test_playground.py

pytestmark = [
    pytest.mark.slow,  # a browser
    pytest.mark.skipif(
        not CHROMIUM.is_file(),
        reason=f"chromium not found at {CHROMIUM}: run `make browser` (or set CHARLSTM_CHROMIUM)",
    ),
]
expect.set_options(timeout=60_000)
SEED, CHARS = "7", 1500
LABELS = {"\x00": "NUL", "\x1b": "ESC", "\x07": "BEL", "\r": "CR", "\u2028": "LS", "\u2029": "PS",
          "\x85": "NEL", "\u200d": "ZWJ", "\ufe0f": "VS16"}


@pytest.fixture(scope="module")
def unicode_server(unicode_models: Path, tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[Server]:
    srv = start_server(unicode_models, tmp_path_factory.mktemp("upg") / "server.log",
                       default="unicode", http_workers="1")
    yield srv
    stop_server(srv)


@pytest.fixture
def page(browser: Browser, unicode_server: Server) -> Iterator[tuple[Page, list[str]]]:
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    page.set_default_timeout(60_000)
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("console", lambda msg: problems.append(f"console: {msg.text}")
            if msg.type == "error" else None)

    def on_response(response: Response) -> None:
        if response.status >= 400:
            problems.append(f"{response.status} for {response.url}")

    page.on("response", on_response)
    page.goto(f"{unicode_server.url}/")
    expect(page.locator("#generate")).to_be_enabled()
    yield page, problems
    context.close()


def reply(server: Server) -> dict[str, Any]:
    with server.client() as c:
        r = c.post("/generate", json={"seed_text": "a", "max_new_chars": CHARS, "seed": int(SEED),
                                      "temperature": 1.0, "details": True})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def test_one_element_per_cluster_shaded_by_its_characters(
        page: tuple[Page, list[str]], unicode_server: Server) -> None:
    pg, problems = page
    fill_form(pg, "a", CHARS, seed=SEED)
    pg.click("#generate")
    expect(pg.locator("#status")).to_have_attribute("data-state", "done")
    pg.get_by_label("Shade by probability").check()

    want = reply(unicode_server)
    clusters = regex.findall(r"\X", want["text"])
    assert any(len(c) > 1 for c in clusters), "the text should hold multi-code-point clusters"
    spans: list[dict[str, Any]] = pg.locator("#output .gen").evaluate_all("""spans =>
        spans.map(s => ({text: s.dataset.text, shown: s.textContent, title: s.title,
                         p: Number(s.style.getPropertyValue('--p')),
                         width: Math.max(0, ...[...s.getClientRects()].map(r => r.width))}))""")
    assert [s["text"] for s in spans] == clusters
    probs = [d["prob"] for d in want["details"]]
    at = 0
    for span, cluster in zip(spans, clusters, strict=True):
        expected = math.prod(probs[at:at + len(cluster)])
        at += len(cluster)
        assert span["p"] == pytest.approx(expected, abs=1e-4)
        assert span["width"] > 0, f"{cluster!r} drawn as {span['shown']!r} has no width"
        for char in cluster:  # the tooltip lists each code point with its probability
            assert f"U+{ord(char):04X}" in span["title"]
        if cluster in LABELS:
            assert span["shown"] == LABELS[cluster]
    assert {"\x00", "\x1b", "\x07"} & set(clusters), "the sample should hold controls"
    ARTIFACTS.mkdir(exist_ok=True)
    pg.screenshot(path=str(ARTIFACTS / "playground-unicode.png"), full_page=True)
    assert not problems, problems


def test_no_request_fails_on_load(page: tuple[Page, list[str]]) -> None:
    pg, problems = page
    pg.wait_for_load_state("networkidle")
    icon = pg.locator("link[rel=icon]").get_attribute("href") or ""
    assert icon.startswith("data:image/svg+xml,")
    assert not problems, problems
