"""The status page in a real browser: Debian's chromium, headless, against a real requester.

Screenshots land in ``build/test-artifacts/`` (or ``$FMA_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest
from browser import Browser

from conftest import EMBEDDED, REPO, requester, wait_for, worker_state

# No skip: without chromium these fail and say why (`make test` installs it with tests/system-deps.sh).
pytestmark = pytest.mark.process

ARTIFACTS = Path(os.environ.get("FMA_TEST_ARTIFACTS", REPO / "build" / "test-artifacts"))
SLASHED = "acme/tiny-<b>"  # a "/" to route and markup that must stay text


def card(model: str) -> str:
    return f"document.querySelector('[data-model=\"{model}\"]')"


def test_the_status_page_warms_sleeps_and_releases_a_model_and_follows_changes(tmp_path: Path,
                                                                               converted_model_dir: Path,
                                                                               tiny_model_dir: Path):
    models = tmp_path / "models.yaml"
    models.write_text(f"models:\n  - {{name: {EMBEDDED}, source: 'embedded:{EMBEDDED}', dtype: float32, "
                      f"idle_timeout: 600s}}\n  - {{name: '{SLASHED}', source: 'path:{tiny_model_dir}'}}\n")
    with requester(tmp_path, models) as req:
        browser = Browser(tmp_path / "chromium")
        try:
            browser.navigate(f"{req.spi}/ui")
            me = card(EMBEDDED)
            browser.wait(f"{me} && {me}.dataset.state === 'cold'", 15, "the model's card, cold")
            assert browser.eval(f"{card(SLASHED)}.querySelector('.name').textContent") == SLASHED
            assert browser.eval("document.querySelectorAll('.name b').length") == 0, "names are text, not markup"
            assert browser.eval(f"{me}.querySelector('[data-action=sleep1]').disabled") is True
            assert browser.eval("getComputedStyle(document.getElementById('auth')).display") == "none", \
                "no key asked for where the requester has none"
            assert [browser.eval(f"seconds({v})") for v in (0.951, 12.34, 299.7, 7800)] == \
                ["0.95s", "12.3s", "5m00s", "2h10m"], "the same durations as the CLI"
            # Every state the card shows, in order, as the page sees it.
            browser.eval(f"""window.seen = [];
                new MutationObserver(() => {{ const p = {me}.dataset.phase;
                    if (window.seen[window.seen.length - 1] !== p) window.seen.push(p); }})
                .observe({me}, {{attributes: true, attributeFilter: ['data-phase']}}); true""")
            browser.eval(f"{me}.querySelector('[data-action=warm]').click(); true")
            browser.wait(f"{me}.dataset.state === 'ready'", 120, "the card to show the model ready")
            assert worker_state(req.spi)["state"] == "ready"
            assert "starting" in browser.eval("window.seen"), "the start shows while it happens"
            assert browser.eval(f"{me}.querySelector('.actuation').textContent").startswith("cold ")
            assert browser.eval(f"{me}.querySelector('.idle_left').textContent").endswith(("m", "s"))
            assert "1 awake" in browser.eval("document.getElementById('summary').textContent")
            browser.screenshot(ARTIFACTS / "status-page.png")

            browser.eval(f"{me}.querySelector('[data-action=sleep2]').click(); true")
            # The phase, not only the state: "going_to_sleep" already shows as state sleeping, and a release
            # sent before the sleep completed would (rightly) win over it.
            browser.wait(f"{me}.dataset.phase === 'sleeping'", 60, "the card to show the model asleep")
            browser.wait(f"{me}.querySelector('.outcome').textContent === 'sleep2: sleeping'", 10,
                         "the button's answer")
            assert worker_state(req.spi)["phase"] == "sleeping"

            # A change made elsewhere (another user, the CLI) shows without touching the page.
            httpx.delete(f"{req.spi}/v1/workers/{EMBEDDED}", timeout=60).raise_for_status()
            changed = time.monotonic()
            browser.wait(f"{me}.dataset.state === 'cold'", 10, "the release made elsewhere to show")
            lag = time.monotonic() - changed
            print(f"status page showed an outside change after {lag:.2f} s")

            # The slashed name routes: warm it from its card.
            browser.eval(f"{card(SLASHED)}.querySelector('[data-action=warm]').click(); true")
            browser.wait(f"{card(SLASHED)}.dataset.state === 'ready'", 120, "the slashed model ready")
            wait_for(lambda: worker_state(req.spi, SLASHED)["state"] == "ready", 5, "the API to agree")

            # A phone: one column, nothing wider than the screen.
            browser.viewport(390, 844, mobile=True)
            browser.navigate(f"{req.spi}/ui")
            browser.wait(f"{me} !== null", 10, "the cards on a phone")
            assert browser.eval("document.documentElement.scrollWidth <= window.innerWidth"), "no sideways scrolling"
            left = browser.eval(f"{me}.getBoundingClientRect().left")
            assert browser.eval(f"{card(SLASHED)}.getBoundingClientRect().left") == left, "cards stack in one column"
            browser.screenshot(ARTIFACTS / "status-page-phone.png")
            assert browser.console_errors == [], "no script errors and no Content-Security-Policy violations"
        finally:
            browser.close()


def test_the_root_serves_the_page_to_a_browser_and_an_index_to_programs(tmp_path: Path, tiny_model_dir: Path):
    models = tmp_path / "models.yaml"
    models.write_text(f"models:\n  - {{name: tiny, source: 'path:{tiny_model_dir}'}}\n")
    with requester(tmp_path, models) as req:
        browser = Browser(tmp_path / "chromium")
        try:
            browser.navigate(f"{req.spi}/")
            browser.wait(f"{card('tiny')} !== null", 15, "the status page at /")
            assert browser.console_errors == []
        finally:
            browser.close()
        index = httpx.get(f"{req.spi}/").json()
        assert index["status_page"] == "/ui"
        page = httpx.get(f"{req.spi}/ui")
        assert "script-src 'self'" in page.headers["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
        assert not [t for t in ("http://", "https://", "//fonts.") if t in page.text], "nothing from elsewhere"
        for asset in ("app.js", "app.css"):
            body = httpx.get(f"{req.spi}/ui/{asset}").text
            assert "http://" not in body and "https://" not in body and "@import" not in body, asset


def test_with_keys_on_the_page_asks_for_one_and_an_inference_key_may_look_but_not_warm(tmp_path: Path,
                                                                                      tiny_model_dir: Path):
    models = tmp_path / "models.yaml"
    models.write_text(f"models:\n  - {{name: tiny, source: 'path:{tiny_model_dir}'}}\n")
    with requester(tmp_path, models, FMA_API_KEYS="look-key", FMA_ADMIN_KEYS="change-key") as req:
        browser = Browser(tmp_path / "chromium")
        try:
            browser.navigate(f"{req.spi}/ui")
            browser.wait("!document.getElementById('auth').hidden", 15, "the page to ask for a key")
            assert browser.eval(f"{card('tiny')} === null"), "nothing shown without a key"

            def use(key: str) -> None:
                browser.eval(f"document.getElementById('key').value = '{key}'; "
                             "document.getElementById('auth').requestSubmit(); true")

            use("look-key")
            browser.wait(f"{card('tiny')} !== null", 15, "the cards, with an inference key")
            browser.eval(f"{card('tiny')}.querySelector('[data-action=warm]').click(); true")
            browser.wait(f"{card('tiny')}.querySelector('.outcome').textContent.includes('403')", 15,
                         "the refusal shown on the card")
            status = httpx.get(f"{req.spi}/v1/workers/tiny", headers={"Authorization": "Bearer look-key"}, timeout=10)
            assert status.json()["state"] == "cold", "the refused warm changed nothing"
            browser.eval("sessionStorage.removeItem('fma-api-key'); true")
            use("change-key")
            browser.eval(f"{card('tiny')}.querySelector('[data-action=warm]').click(); true")
            browser.wait(f"{card('tiny')}.dataset.state === 'ready'", 120, "the model warmed with an admin key")
            assert "look-key" not in req.log() and "change-key" not in req.log()
        finally:
            browser.close()
