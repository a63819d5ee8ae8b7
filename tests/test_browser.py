"""The web page end to end: `llmclf serve` in a subprocess, driven by headless Chromium (Playwright):
classifying and errors, the API docs, hostile label names and texts shown as text, the key field
only where a key is needed, no Content-Security-Policy violation, and CORS for the given origin only.

Needs Debian's chromium at /usr/bin/chromium (`make test` installs it in CI). Locally the test is
skipped with the reason when the browser or the `playwright` package is missing; in CI (CI=true)
a missing browser fails instead, so the end-to-end check cannot silently vanish.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
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


def _serve(tmp_path_factory, model: Path, *options: str):
    """`llmclf serve --model MODEL OPTIONS` on a free loopback port: yields its URL, stops it after."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llmclf", "serve", "--model", str(model), "--port", str(port),
             "--precision", "float32", "--no-access-log", *options],
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
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory, shared_dir):
    """`llmclf serve` with an API key (from a file) and at most 5 texts per request."""
    _need_browser()
    model = tiny_classifier_dir(tmp_path_factory, shared_dir)
    key_file = tmp_path_factory.mktemp("key") / "api-key"
    key_file.write_text(API_KEY + "\n")
    for url in _serve(tmp_path_factory, model, "--api-key-file", str(key_file), "--max-texts", "5"):
        yield url, model


HOSTILE_LABELS = ['<img src=x onerror="window.__xss=1">', "</script><script>window.__xss=2</script><!--<script>"]
HOSTILE_BACKBONE = '<svg onload="window.__xss=3">'


@pytest.fixture(scope="module")
def other_site():
    """A blank page on another loopback server: its origin http://localhost:PORT is given to
    open_server's --cors-origin, http://127.0.0.1:PORT is not. (A real server, not Playwright's
    routing: with routes set, Playwright answers CORS preflights itself.)"""

    class Blank(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<!doctype html><title>another site</title>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Blank)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    port = site.server_address[1]
    yield f"http://localhost:{port}", f"http://127.0.0.1:{port}"
    site.shutdown()


@pytest.fixture(scope="module")
def open_server(tmp_path_factory, shared_dir, other_site):
    """`llmclf serve` without an API key, with CORS for the other site's allowed origin, serving the tiny
    classifier with its labels renamed to HTML/script injections (as a hostile config.json could name them)."""
    _need_browser()
    model = tmp_path_factory.mktemp("hostile") / "model"
    shutil.copytree(tiny_classifier_dir(tmp_path_factory, shared_dir), model)
    config = json.loads((model / "config.json").read_text())
    assert config["labels"] == ["neg", "pos"]
    config["labels"], config["backbone"] = HOSTILE_LABELS, HOSTILE_BACKBONE
    (model / "config.json").write_text(json.dumps(config))
    yield from _serve(tmp_path_factory, model, "--cors-origin", other_site[0])


def _watch(page) -> list[str]:
    """Console errors and failed requests of `page` (a CSP violation shows as a console error)."""
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    return problems


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
            problems = _watch(page)
            page.goto(url + "/")
            expect(page).to_have_title("llmclf: try the classifier")
            expect(page.locator("#api-key")).to_be_visible()  # this server needs a key
            assert page.locator("#api-key").get_attribute("placeholder") == "required by this server"

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
    # The API's 401 and 413 show as console errors ("Failed to load resource"); nothing else may.
    assert [p for p in problems if "status of 401" not in p and "status of 413" not in p] == []


def test_the_page_highlights_the_attributions_the_api_gives(server):
    """With "Explain" ticked, each text is shown as its pieces, highlighted, in order and complete; the
    values on the spans are the API's attributions (the same request through httpx), summing as it says."""
    from playwright.sync_api import expect, sync_playwright

    url, _ = server
    texts = [POSITIVE, "naïve 🎉 <b>awful</b> sad"]
    api = httpx.post(f"{url}/v1/classify", json={"texts": texts, "explain": True},
                     headers={"X-API-Key": API_KEY}, timeout=60).json()["results"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            problems = _watch(page)
            page.goto(url + "/")
            page.fill("#api-key", API_KEY)
            page.fill("#texts", "\n".join(texts))
            page.check("#explain")
            page.click("#classify")
            explained = page.locator("[data-testid=explained]")
            expect(explained).to_have_count(len(texts))
            for i, (text, result) in enumerate(zip(texts, api, strict=True)):
                tokens = result["explanation"]["tokens"]
                assert explained.nth(i).inner_text() == text  # pieces and gaps together: the text itself
                spans = explained.nth(i).locator("[data-testid=token]")
                expect(spans).to_have_count(len(tokens))
                assert spans.all_inner_texts() == [t["text"] for t in tokens]
                values = [float(spans.nth(j).get_attribute("data-attribution")) for j in range(len(tokens))]
                assert values == pytest.approx([t["attribution"] for t in tokens], abs=1e-9)
                total = sum(t["attribution"] for t in tokens)
                explanation = result["explanation"]
                assert sum(values) == pytest.approx(explanation["score"] - explanation["baseline_score"]
                                                    - explanation["delta"], abs=1e-6)
                assert f"Sum {total:.4f}" in page.locator("[data-testid=why]").nth(i).inner_text()
                colour = spans.nth(0).evaluate("e => getComputedStyle(e).backgroundColor")
                assert colour.startswith("rgba(")  # highlighted
            assert page.locator("#results b, #results script").count() == 0  # the text's <b> shows as text
            SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT_DIR / "serve_explain.png"), full_page=True)
        finally:
            browser.close()
    assert problems == []


def test_the_api_docs_render_offline(server):
    """/docs shows the API in Swagger UI with every asset from the server itself (no CDN)."""
    from playwright.sync_api import expect, sync_playwright

    url, _ = server
    external = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            problems = _watch(page)
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(url)
                       else (external.append(route.request.url), route.abort()))
            response = page.goto(url + "/docs")
            assert "default-src 'self'" in response.headers["content-security-policy"]
            expect(page.locator(".swagger-ui .info .title")).to_contain_text("llmclf")
            expect(page.locator(".opblock-summary-path", has_text="/v1/classify")).to_be_visible()
            page.locator(".opblock-summary-path", has_text="/v1/classify").click()  # expand: the schema renders
            expect(page.locator(".opblock-body").first).to_be_visible()
        finally:
            browser.close()
    assert external == [] and problems == []  # every asset from this server, nothing blocked by the CSP


def test_hostile_labels_and_texts_render_as_text_and_no_key_is_asked_for(open_server):
    """Labels and a backbone name that are HTML/script injections, and an injected text, show as
    plain text: no script runs, no image loads; the page of a server without a key has no key field."""
    from playwright.sync_api import expect, sync_playwright

    url = open_server
    hostile_text = '<img src=y onerror="window.__xss=4"> great wonderful happy'
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            problems = _watch(page)
            requested: list[str] = []
            page.on("request", lambda r: requested.append(r.url))
            page.goto(url + "/")
            expect(page.locator("#model-line")).to_contain_text(HOSTILE_LABELS[0])
            assert page.locator("#model-line").inner_text() == (f"Model {HOSTILE_BACKBONE} \u00b7 labels: "
                                                                 f"{', '.join(HOSTILE_LABELS)} \u00b7 up to 256 texts "
                                                                 "per request")
            expect(page.locator("#api-key")).to_be_hidden()  # no key on this server: no key field
            assert "required" not in page.locator("body").inner_text().lower()

            page.fill("#texts", f"{POSITIVE}\n{NEGATIVE}\n{hostile_text}")
            page.click("#classify")
            expect(page.locator("[data-testid=result]")).to_have_count(3)
            labels = page.locator("[data-testid=label]").all_inner_texts()
            assert labels[:2] == [HOSTILE_LABELS[1], HOSTILE_LABELS[0]]  # "pos", "neg" renamed
            assert page.locator("[data-testid=result] .text").nth(2).inner_text() == hostile_text
            assert set(page.locator(".bars .name").all_inner_texts()) == set(HOSTILE_LABELS)
            assert page.locator("#results img, #results script, #results svg, #model-line *").count() == 0
            assert page.evaluate("window.__xss") is None

            response = page.goto(url + "/docs")  # the labels are in the API description too
            expect(page.locator(".swagger-ui .info .title")).to_contain_text("llmclf")
            assert page.evaluate("window.__xss") is None
            assert "default-src 'self'" in response.headers["content-security-policy"]
        finally:
            browser.close()
    assert not [u for u in requested if u.endswith(("/x", "/y"))]  # the injected <img> never loaded
    assert problems == []


def test_cors_lets_only_the_given_origin_call_the_api(open_server, other_site):
    """A page of the --cors-origin origin may call the API from the browser; any other origin's
    page is blocked by the browser (the server sends it no CORS headers)."""
    from playwright.sync_api import sync_playwright

    url, (allowed, other) = open_server, other_site
    call = """async (url) => {
        try {
            const r = await fetch(url + "/v1/classify", {method: "POST", headers: {"Content-Type": "application/json"},
                                                        body: JSON.stringify({texts: ["great"]})});
            return String(r.status) + " " + (await r.json()).results.length;
        } catch (e) { return "blocked: " + e.name; }
    }"""
    outcome = {}
    texts_before = httpx.get(f"{url}/healthz").json()["texts"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            for origin in (allowed, other):
                page = browser.new_page()
                page.goto(origin + "/")
                outcome[origin] = page.evaluate(call, url)
                page.close()
        finally:
            browser.close()
    assert outcome == {allowed: "200 1", other: "blocked: TypeError"}
    assert httpx.get(f"{url}/healthz").json()["texts"] == texts_before + 1  # the refused preflight ran nothing


@pytest.fixture(scope="module")
def multi_label_server(tmp_path_factory, shared_dir):
    """`llmclf serve` of a tiny multi-label classifier (labels money, sport, tech)."""
    _need_browser()
    from tiny_classifier import multi_label_classifier_dir

    model = multi_label_classifier_dir(tmp_path_factory, shared_dir)
    for url in _serve(tmp_path_factory, model):
        yield url, model


def test_the_page_shows_a_chip_per_label_of_a_multi_label_model(multi_label_server):
    from playwright.sync_api import expect, sync_playwright

    from llmclf.classifier import load_classifier

    url, model = multi_label_server
    texts = ["note: goal match team and chip code robot", "note: bank stock price"]
    clf = load_classifier(model, precision="float32")
    probs = clf.predict_proba(texts)  # the chips: the labels over their thresholds, most probable first
    expected = [sorted(label.split(","), key=lambda name: -row[clf.classes_.index(name)])
                for label, row in zip(clf.predict(texts), probs, strict=True)]
    assert [sorted(e) for e in expected] == [["sport", "tech"], ["money"]]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            problems = _watch(page)
            page.goto(url + "/")
            page.fill("#texts", "\n".join(texts))
            page.click("#classify")
            results = page.locator("[data-testid=result]")
            expect(results).to_have_count(2)
            for i, names in enumerate(expected):
                chips = results.nth(i).locator("[data-testid=chip]").all_inner_texts()
                assert [chip.split(" ")[0] for chip in chips] == names
                assert all(chip.endswith("%") for chip in chips)
                assert results.nth(i).locator("[data-testid=label]").count() == 0
                assert results.nth(i).locator("[data-testid=bar]").count() == 3
            SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT_DIR / "serve_page_multi_label.png"), full_page=True)
            assert problems == []
        finally:
            browser.close()
