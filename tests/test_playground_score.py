"""The playground's "Score this text" view in a real browser (Debian's chromium, headless):
every character of the text box shaded by the probability POST /score gives it, the same
numbers the API returns. Skips without chromium, as tests/test_playground.py."""

from __future__ import annotations

import math

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests.conftest import Server
from tests.test_playground import CHROMIUM, browser, page  # noqa: F401  (fixtures)

pytestmark = [
    pytest.mark.slow,  # a browser
    pytest.mark.skipif(
        not CHROMIUM.is_file(), reason=f"chromium not found at "
        f"{CHROMIUM}: run `make browser` (or set CHARLSTM_CHROMIUM)",
    ),
]


def test_score_view_shades_each_character_by_its_probability(page: Page,  # noqa: F811
                                                            server: Server) -> None:
    text = "ROMEO:\nWhat light is that?"
    page.fill("#seed-text", text)
    page.click("#score")
    expect(page.locator("#status")).to_have_attribute("data-state", "done")
    expect(page.locator("#status")).to_contain_text(f"Scored {len(text)} characters")
    spans = page.locator("#output .gen")
    expect(spans).to_have_count(len(text))
    assert page.locator("#output").evaluate("o => o.classList.contains('shaded')")
    shown = spans.evaluate_all("s => s.map(x => [x.dataset.text, "
                               "Number(x.style.getPropertyValue('--p'))])")
    api = httpx.post(f"{server.url}/score", json={"text": text}, timeout=30).json()
    assert "".join(t for t, _ in shown) == text
    for (_, p), c in zip(shown, api["logprobs"], strict=True):
        assert p == pytest.approx(math.exp(c["logprob"]), abs=1e-4)
    assert f"{api['bits_per_char']:.3f} bits per character" in page.locator("#status").inner_text()


def test_score_view_shows_the_services_refusal(page: Page) -> None:  # noqa: F811
    page.fill("#seed-text", "caf\u00e9 \u00e9")
    page.click("#score")
    expect(page.locator("#error")).to_contain_text("'\u00e9' at 3, 5")
