"""The web page end to end: `llmclf serve` in a subprocess, driven by headless Chromium (Playwright).

Needs Debian's chromium at /usr/bin/chromium (`make test` installs it in CI). Locally the test is
skipped with the reason when the browser or the `playwright` package is missing; in CI (CI=true)
a missing browser fails instead, so the end-to-end check cannot silently vanish.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tiny_classifier import NEGATIVE, POSITIVE, tiny_classifier_dir

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOT_DIR = Path(__file__).resolve().parents[1] / "runs" / "screenshots"
API_KEY = "test-key-123"


def _need_browser() -> None:
    problems = []
    if not CHROMIUM.exists():
        problems.append(f"{CHROMIUM} is missing (apt-get install chromium; `make test` does it when CI=true)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problems.append("the playwright package is missing (pip install -e '.[dev]')")
    if problems:
        if os.environ.get("CI") == "true":
            pytest.fail("browser test cannot run in CI: " + "; ".join(problems))
        pytest.skip("; ".join(problems))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, shared_dir):
    """`llmclf serve` with an API key and at most 5 texts per request, on a free loopback port."""
    _need_browser()
    model = tiny_classifier_dir(tmp_path_factory, shared_dir)
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llmclf", "serve", "--model", str(model), "--port", str(port),
             "--api-key", API_KEY, "--max-texts", "5", "--precision", "float32", "--no-access-log"],
            stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llmclf serve exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llmclf serve did not answer within 90 s:\n{log.read_text()}")
            time.sleep(0.2)
        yield url, model
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_the_page_classifies_texts_and_shows_errors(server):
    from playwright.sync_api import expect, sync_playwright

    from llmclf.classifier import load_classifier

    url, model = server
    texts = [POSITIVE, NEGATIVE, "great", "so very sad"]
    expected = load_classifier(model, precision="float32").predict(texts)
    assert expected[:2] == ["pos", "neg"]

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 900})
            page.goto(url + "/")
            expect(page).to_have_title("llmclf: try the classifier")
            expect(page.locator("#api-key")).to_be_visible()  # this server needs a key

            # Without the key: the API's 401 is shown.
            page.fill("#texts", "\n".join(texts) + "\n\n")
            page.click("#classify")
            expect(page.locator("#error")).to_contain_text("Error 401")
            expect(page.locator("#error")).to_contain_text("API key")

            # Too many texts: the API's 413 is shown.
            page.fill("#api-key", API_KEY)
            page.fill("#texts", "\n".join(f"text {i}" for i in range(6)))
            page.click("#classify")
            expect(page.locator("#error")).to_contain_text("Error 413")

            # The real thing.
            page.fill("#texts", "\n".join(texts))
            page.click("#classify")
            results = page.locator("[data-testid=result]")
            expect(results).to_have_count(len(texts))
            expect(page.locator("#error")).to_be_hidden()
            labels = page.locator("[data-testid=label]").all_inner_texts()
            assert labels == expected
            for i in range(len(texts)):
                card = results.nth(i)
                assert card.locator(".text").inner_text() == texts[i]
                bars = card.locator("[data-testid=bar]")
                assert bars.count() == 2
                widths = [float(bars.nth(j).evaluate("e => parseFloat(e.style.width)")) for j in range(2)]
                assert widths[0] >= widths[1] and sum(widths) == pytest.approx(100, abs=0.1)
                assert bars.nth(0).get_attribute("data-class") == expected[i]  # the top bar is the label
            SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
            shot = SCREENSHOT_DIR / "serve_page.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            print(f"\nscreenshot: {shot}")
        finally:
            browser.close()


def test_the_api_docs_render_offline(server):
    """/docs shows the API in Swagger UI with every asset from the server itself (no CDN)."""
    from playwright.sync_api import expect, sync_playwright

    url, _ = server
    external = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(url)
                       else (external.append(route.request.url), route.abort()))
            page.goto(url + "/docs")
            expect(page.locator(".swagger-ui .info .title")).to_contain_text("llmclf")
            expect(page.locator(".opblock-summary-path", has_text="/v1/classify")).to_be_visible()
        finally:
            browser.close()
    assert external == []
