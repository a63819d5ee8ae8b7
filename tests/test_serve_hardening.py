"""The server under attack and faults: graceful drain on SIGTERM/SIGINT, the API key (file, warning,
never logged, any header bytes), CSP and CORS headers, bounded resources (characters per text,
header size, idle and slow connections, connection count) and fuzzed request bodies (hypothesis)."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from llmclf.cli import app as cli_app
from llmclf.errors import ConfigError
from llmclf.serve import create_app
from llmclf.serve.server import read_api_key_file, run_server, uvicorn_config
from test_serve import FakeClassifier, ServerThread, free_port
from tiny_classifier import NEGATIVE, POSITIVE, tiny_classifier_dir

settings.register_profile("serve-fuzz", max_examples=100, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("serve-fuzz-slow", max_examples=3000, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
PROFILES = [pytest.param("serve-fuzz", id="100-examples"),
            pytest.param("serve-fuzz-slow", id="3000-examples", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def tiny_clf(tmp_path_factory, shared_dir):
    from llmclf.classifier import load_classifier

    return load_classifier(tiny_classifier_dir(tmp_path_factory, shared_dir), precision="float32")


def wait_for_health(url: str, proc: subprocess.Popen | None = None, log: Path | None = None, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"llmclf serve exited with {proc.returncode}:\n{log.read_text() if log else ''}")
        try:
            response = httpx.get(f"{url}/healthz", timeout=2)
            if response.status_code == 200:
                return response.json()
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"no answer from {url}:\n{log.read_text() if log else ''}"
        time.sleep(0.05)


def post_raw(port: int, n_texts: int, tag: str, key: str | None = None) -> http.client.HTTPConnection:
    """A POST /v1/classify sent in full on its own connection; read it later with `getresponse()`."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    conn.request("POST", "/v1/classify", body=json.dumps({"texts": [f"{tag} text {j} great" for j in range(n_texts)]}),
                 headers=headers)
    return conn


def read_responses(conns: list[http.client.HTTPConnection]) -> tuple[list, threading.Event, list[threading.Thread]]:
    """Read every connection's response in a thread of its own: (status, body) pairs, set when all are in."""
    results: list = [None] * len(conns)
    done = threading.Event()

    def read(i: int) -> None:
        try:
            response = conns[i].getresponse()
            results[i] = (response.status, response.read())
        except OSError as exc:
            results[i] = (type(exc).__name__, b"")
        if all(r is not None for r in results):
            done.set()

    threads = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(len(conns))]
    for t in threads:
        t.start()
    return results, done, threads


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except ConnectionRefusedError:
        return True


def wait_until_refused(port: int, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if refused(port):
            return True
        time.sleep(0.02)
    return False


# --- graceful drain -----------------------------------------------------------------------------


def test_sigterm_under_load_finishes_requests_in_flight_refuses_new_connections_exits_0_and_never_logs_the_key(
        tmp_path_factory, shared_dir, tmp_path):
    model = tiny_classifier_dir(tmp_path_factory, shared_dir)
    key = "k3y-" + os.urandom(8).hex()
    key_file = tmp_path / "api-key"
    key_file.write_text(f"  {key}  \nsecond line ignored\n")
    port, log = free_port(), tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    n_requests, n_texts = 6, 200  # --max-batch 1: 1-2 ms a text here, so each request runs for a while
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llmclf", "serve", "--model", str(model), "--port", str(port), "--api-key-file",
             str(key_file), "--max-batch", "1", "--max-texts", str(n_texts), "--max-queue", "10000",
             "--precision", "float32"],
            stdout=log_file, stderr=subprocess.STDOUT)
    try:
        wait_for_health(url, proc, log)
        assert httpx.post(f"{url}/v1/classify", json={"texts": ["x"]}, headers={"X-API-Key": "wrong-" + key}
                          ).status_code == 401
        conns = [post_raw(port, n_texts, f"request {i}", key) for i in range(n_requests)]
        deadline = time.monotonic() + 30
        while True:  # every request is in the server: waiting, running or answered
            health = wait_for_health(url)
            if health["queued_texts"] + health["running_texts"] + health["texts"] == n_requests * n_texts:
                break
            assert time.monotonic() < deadline, health
            time.sleep(0.01)
        assert health["queued_texts"] >= 2 * n_texts  # at least two requests still wait for inference
        proc.send_signal(signal.SIGTERM)
        results, done, _ = read_responses(conns)
        assert wait_until_refused(port), "new connections are still accepted after SIGTERM"
        assert not done.is_set(), "the drain ended before new connections were refused"
        assert proc.wait(30) == 0
        assert done.wait(5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert [status for status, _ in results] == [200] * n_requests, text
    assert all(len(json.loads(body)["results"]) == n_texts for _, body in results)
    assert text.count('"POST /v1/classify HTTP/1.1" 200') == n_requests  # the access log was on
    assert "API key required" in text and "timeout graceful shutdown exceeded" not in text
    assert key not in text  # neither the startup lines nor the access log show the key
    assert "process list" not in text  # no --api-key warning for a key from a file


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_run_server_drains_on_a_signal_and_returns_normally(sig):
    fake = FakeClassifier(delay=0.25)
    port = free_port()
    config = uvicorn_config(create_app(fake, max_batch=1, max_wait_ms=0), port=port, log_level="warning",
                            shutdown_timeout=10)
    outcome: dict = {}

    def clients() -> None:
        try:
            wait_for_health(f"http://127.0.0.1:{port}", timeout=20)
            conns = [post_raw(port, 1, f"good {i}") for i in range(4)]
            deadline = time.monotonic() + 20
            while config.app.state.batcher.queued_texts < 2:  # one request runs, the others wait
                assert time.monotonic() < deadline, "the requests never queued up"
                time.sleep(0.005)
            os.kill(os.getpid(), sig)
            results, done, threads = read_responses(conns)
            outcome["refused_while_draining"] = wait_until_refused(port) and not done.is_set()
            for t in threads:
                t.join(20)
            outcome["results"] = results
        except BaseException as exc:  # reported by the main thread, once this stops the server
            outcome["error"] = exc
            os.kill(os.getpid(), signal.SIGTERM)

    reraised: list[int] = []
    previous = {s: signal.signal(s, lambda number, frame: reraised.append(number))
                for s in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=clients, daemon=True)
    try:
        thread.start()
        run_server(config)  # returns once drained: no exception, no signal re-raised to the old handler
        thread.join(30)
        installed = {s: signal.getsignal(s) for s in previous}
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert "error" not in outcome, outcome.get("error")
    assert [status for status, _ in outcome["results"]] == [200] * 4
    assert outcome["refused_while_draining"]
    assert reraised == [] and all(h.__name__ == "<lambda>" for h in installed.values())  # our handlers back
    assert sum(len(b) for b in fake.batches) == 4


# --- the API key --------------------------------------------------------------------------------


def test_api_key_accepts_any_header_bytes_and_compares_them_exactly():
    key = "clé-секрет"  # non-ASCII: clients send its UTF-8 bytes
    app = create_app(FakeClassifier(), api_key=key)
    with TestClient(app) as c:
        def status(headers: dict) -> int:
            return c.post("/v1/classify", json={"texts": ["good"]}, headers=headers).status_code

        assert status({"X-API-Key": key.encode()}) == 200
        assert status({"Authorization": b"Bearer " + key.encode()}) == 200
        for wrong in (key.encode("latin-1", "replace"), b"\xff\xfe\x00", "cl\u00e9".encode("latin-1"), b"",
                      key.encode()[:-1], key.encode() + b"x", b"Bearer"):
            assert status({"X-API-Key": wrong}) == 401, wrong
            assert status({"Authorization": b"Bearer " + wrong}) == 401, wrong


def test_api_key_file_first_line_and_clear_errors(tmp_path):
    good = tmp_path / "key"
    good.write_text("\t s3cret \r\nignored\n")
    assert read_api_key_file(good) == "s3cret"
    empty = tmp_path / "empty"
    empty.write_text("\n  \nkey on line 2\n")
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\xfa key\n")
    for path, message in ((tmp_path / "missing", "no such file"), (empty, "first line is empty"),
                          (tmp_path, "cannot read it"), (binary, "cannot read it")):
        with pytest.raises(ConfigError, match=message) as info:
            read_api_key_file(path)
        assert str(path) in str(info.value)


@pytest.fixture
def cli_serve(monkeypatch):
    """Run `llmclf serve ...` in-process without a model or a socket: returns (result, uvicorn config)."""
    import llmclf.classifier
    import llmclf.serve.server

    captured: dict = {}
    monkeypatch.setattr(llmclf.classifier, "load_classifier", lambda *a, **k: FakeClassifier())
    monkeypatch.setattr(llmclf.serve.server, "run_server", lambda config: captured.update(config=config))
    monkeypatch.delenv("LLMCLF_API_KEY", raising=False)

    def invoke(*args: str, env: dict | None = None):
        result = CliRunner().invoke(cli_app, ["serve", "--model", "m", *args], env=env)
        return result, captured.pop("config", None)

    return invoke


def test_cli_api_key_sources_warning_and_refusals(cli_serve, tmp_path, caplog):
    key = "cli-key-" + os.urandom(4).hex()
    key_file = tmp_path / "key"
    key_file.write_text(key + "\n")

    def requires(config, expected_key: str) -> None:
        with TestClient(config.app) as c:
            assert c.get("/v1/model").status_code == 401
            assert c.get("/v1/model", headers={"X-API-Key": expected_key}).status_code == 200

    result, config = cli_serve("--api-key", key)
    assert result.exit_code == 0, result.output
    assert "process list" in result.output and "LLMCLF_API_KEY or --api-key-file" in result.output
    requires(config, key)

    for args, env in ((["--api-key-file", str(key_file)], None), ([], {"LLMCLF_API_KEY": key})):
        result, config = cli_serve(*args, env=env)
        assert result.exit_code == 0, result.output
        assert "process list" not in result.output, (args, env)  # no warning: the key is not on the command line
        assert "API key required" in result.output
        requires(config, key)

    for args, env, message in (
            (["--api-key", key, "--api-key-file", str(key_file)], None, "--api-key and --api-key-file"),
            (["--api-key-file", str(key_file)], {"LLMCLF_API_KEY": key}, "$LLMCLF_API_KEY and --api-key-file"),
            (["--api-key-file", str(tmp_path / "nope")], None, "no such file"),
            (["--api-key", " "], None, "--api-key is empty")):
        result, config = cli_serve(*args, env=env)
        assert result.exit_code != 0 and config is None, result.output
        assert message in str(result.exception) + result.output
    for output in (caplog.text, *(r.getMessage() for r in caplog.records)):
        assert key not in output


def test_cli_limits_reach_uvicorn_and_the_app(cli_serve):
    result, config = cli_serve("--max-header-bytes", "4096", "--max-connections", "7", "--keep-alive-timeout", "2.5",
                               "--request-timeout", "9", "--shutdown-timeout", "11", "--max-chars", "5",
                               "--cors-origin", "https://a.example", "--cors-origin", "https://b.example")
    assert result.exit_code == 0, result.output
    assert (config.h11_max_incomplete_event_size, config.limit_concurrency, config.timeout_keep_alive,
            config.timeout_graceful_shutdown, config.http.request_timeout) == (4096, 7, 2.5, 11, 9)
    with TestClient(config.app) as c:
        assert c.post("/v1/classify", json={"texts": ["123456"]}).status_code == 413
        for origin, allowed in (("https://b.example", True), ("https://c.example", False)):
            r = c.get("/healthz", headers={"Origin": origin})
            assert (r.headers.get("access-control-allow-origin") == origin) is allowed
    help_text = CliRunner().invoke(cli_app, ["serve", "--help"], env={"COLUMNS": "250"}).output
    for option in ("--api-key-file", "--max-chars", "--max-header-bytes", "--max-connections", "--keep-alive-timeout",
                   "--request-timeout", "--shutdown-timeout", "--cors-origin", "--max-queue"):
        assert option in help_text


# --- browser-facing headers ---------------------------------------------------------------------


SECURITY_HEADERS = {"x-content-type-options": "nosniff", "referrer-policy": "no-referrer", "x-frame-options": "DENY"}


def test_every_response_carries_the_csp_and_hardening_headers():
    fake = FakeClassifier()
    app = create_app(fake, api_key="k", max_texts=2)
    with TestClient(app, headers={"X-API-Key": "k"}) as c:
        responses = {
            "page": c.get("/"), "script": c.get("/static/index.js"), "style": c.get("/static/index.css"),
            "docs": c.get("/docs"), "openapi": c.get("/openapi.json"), "health": c.get("/healthz"),
            "ok": c.post("/v1/classify", json={"texts": ["good"]}),
            "401": c.post("/v1/classify", json={"texts": ["good"]}, headers={"X-API-Key": "no"}),
            "404": c.get("/static/index.html"), "413": c.post("/v1/classify", json={"texts": ["a", "b", "c"]}),
            "422": c.post("/v1/classify", content=b"{"), "405": c.delete("/v1/classify"),
            "500": c.post("/v1/classify", json={"texts": ["boom"]}),
        }
    expected_status = {"401": 401, "404": 404, "413": 413, "422": 422, "405": 405, "500": 500}
    for name, r in responses.items():
        assert r.status_code == expected_status.get(name, 200), (name, r.text)
        csp = r.headers.get("content-security-policy", "")
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe" not in csp, name
        for header, value in SECURITY_HEADERS.items():
            assert r.headers.get(header) == value, (name, header)
        assert "access-control-allow-origin" not in r.headers  # no CORS without --cors-origin
    assert responses["script"].headers["content-type"].startswith("text/javascript")
    assert responses["style"].headers["content-type"].startswith("text/css")


def test_the_page_has_no_inline_code_and_the_docs_script_is_allowed_by_its_hash():
    with TestClient(create_app(FakeClassifier())) as c:
        page, docs = c.get("/"), c.get("/docs")
    csp = docs.headers["content-security-policy"]
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", page.text, flags=re.S)
    assert [attrs for attrs, body in scripts if body.strip()] == [' id="llmclf-config" type="application/json"']
    assert "<style" not in page.text and not re.search(r"\s(on\w+|style)=", page.text)
    inline = [body for attrs, body in re.findall(r"<script([^>]*)>(.*?)</script>", docs.text, flags=re.S)
              if "src=" not in attrs]
    assert len(inline) == 1
    digest = base64.b64encode(hashlib.sha256(inline[0].encode()).digest()).decode()
    assert f"'sha256-{digest}'" in csp
    assert "validatorUrl" in inline[0] and "null" in inline[0]  # Swagger UI calls no outside validator


HOSTILE_LABELS = ['<img src=x onerror="window.__xss=1">', "</script><script>window.__xss=2</script>",
                  "<!--<script>", "a&amp;b \u2028 \"'`${x}"]


def test_hostile_labels_stay_data_in_the_page():
    fake = FakeClassifier()
    fake.classes_ = HOSTILE_LABELS[:2]
    fake.info = lambda: {"labels": fake.classes_, "backbone": HOSTILE_LABELS[2] + HOSTILE_LABELS[3]}
    with TestClient(create_app(fake)) as c:
        page = c.get("/").text
        description = c.get("/openapi.json").json()["info"]["description"]
    # /docs renders the description as Markdown with HTML: the labels are in it as character references.
    assert not set("<>`\"'") & set(description)
    assert "&#60;img src=x onerror=&#34;window.&#95;&#95;xss=1&#34;&#62;" in description
    block = re.search(r'<script id="llmclf-config" type="application/json">(.*?)</script>', page, flags=re.S).group(1)
    assert "<" not in block and ">" not in block and "&" not in block
    assert json.loads(block)["labels"] == HOSTILE_LABELS[:2]
    assert json.loads(block)["backbone"] == HOSTILE_LABELS[2] + HOSTILE_LABELS[3]
    assert page.count("<script") == 2 and page.count("</script>") == 2  # the data block and index.js


def test_labels_that_cannot_be_json_are_refused_at_start():
    fake = FakeClassifier()
    fake.classes_ = ["ok", "\ud800"]  # a lone surrogate: valid in a JSON file as "\\ud800", not in UTF-8
    with pytest.raises(ConfigError, match="labels or config cannot be served as JSON"):
        create_app(fake)


def test_cors_only_for_the_given_origins_and_preflight_needs_no_key():
    allowed, other = "https://app.example", "https://evil.example"
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    with TestClient(create_app(FakeClassifier(), api_key="k", cors_origins=[allowed])) as c:
        ok = c.options("/v1/classify", headers={"Origin": allowed} | preflight)
        bad = c.options("/v1/classify", headers={"Origin": other} | preflight)
        post = c.post("/v1/classify", json={"texts": ["good"]}, headers={"Origin": allowed, "X-API-Key": "k"})
        denied = c.post("/v1/classify", json={"texts": ["good"]}, headers={"Origin": allowed})
        foreign = c.post("/v1/classify", json={"texts": ["good"]}, headers={"Origin": other, "X-API-Key": "k"})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == allowed
    assert "POST" in ok.headers["access-control-allow-methods"]
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    assert bad.status_code == 400 and "access-control-allow-origin" not in bad.headers
    assert post.status_code == 200 and post.headers["access-control-allow-origin"] == allowed
    assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == allowed  # readable 401
    assert foreign.status_code == 200 and "access-control-allow-origin" not in foreign.headers
    for r in (ok, bad, post, denied):
        assert "default-src 'self'" in r.headers["content-security-policy"]

    with TestClient(create_app(FakeClassifier())) as c:  # no --cors-origin: no CORS at all
        r = c.options("/v1/classify", headers={"Origin": allowed} | preflight)
        simple = c.post("/v1/classify", json={"texts": ["good"]}, headers={"Origin": allowed})
    assert r.status_code == 405 and not any(h.startswith("access-control-") for h in r.headers)
    assert simple.status_code == 200 and not any(h.startswith("access-control-") for h in simple.headers)


# --- bounded resources --------------------------------------------------------------------------


def test_characters_per_text_are_bounded_with_the_text_named():
    fake = FakeClassifier()
    with TestClient(create_app(fake, max_chars=10)) as c:
        at_limit = c.post("/v1/classify", json={"texts": ["x" * 10, "😀" * 10]})
        over = c.post("/v1/classify", json={"texts": ["ok", "y" * 11, "fine", "z" * 50]})
    assert at_limit.status_code == 200
    assert over.status_code == 413
    assert over.json()["detail"].startswith("texts[1] (and 1 more): 11 characters; the limit is 10 per text")
    assert "--max-chars" in over.json()["detail"] and len(fake.batches) == 1  # the long request never ran


def _recv_until_closed(sock: socket.socket, limit: float) -> tuple[bytes, float]:
    """What the server sends until it closes the connection, and the seconds that took (inf: still open)."""
    sock.settimeout(0.05)
    data, start = b"", time.monotonic()
    while time.monotonic() - start < limit:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return data, time.monotonic() - start
        if not chunk:
            return data, time.monotonic() - start
        data += chunk
    return data, float("inf")


def test_oversized_headers_are_refused():
    with ServerThread(create_app(FakeClassifier()), max_header_bytes=4096) as url:
        port = int(url.rsplit(":", 1)[1])
        replies = {}
        for size, pieces in ((3900, 1), (5000, 1), (5000, 50), (200_000, 1), (100, 1)):
            head = (b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: " + b"p" * (size - 60)).ljust(
                size - 4, b"p") + b"\r\n\r\n"
            with socket.create_connection(("127.0.0.1", port)) as sock:
                step = -(-len(head) // pieces)
                try:
                    for i in range(0, len(head), step):  # at once, or in pieces as a slow client would
                        sock.sendall(head[i:i + step])
                        time.sleep(0.002 if pieces > 1 else 0)
                except OSError:
                    pass  # refused before the client finished sending
                replies[size, pieces] = _recv_until_closed(sock, 3)
        assert replies[3900, 1][0].startswith(b"HTTP/1.1 200") and replies[100, 1][0].startswith(b"HTTP/1.1 200")
        for case in ((5000, 1), (5000, 50), (200_000, 1)):
            reply, closed_after = replies[case]
            assert reply.startswith(b"HTTP/1.1 431") and b"--max-header-bytes (4096)" in reply, case
            assert closed_after < 3, case
        assert httpx.get(f"{url}/healthz").status_code == 200


def test_idle_silent_and_slow_connections_are_closed():
    keep_alive, request_timeout = 0.3, 1.5
    with ServerThread(create_app(FakeClassifier()), keep_alive_timeout=keep_alive,
                      request_timeout=request_timeout) as url:
        port = int(url.rsplit(":", 1)[1])
        outcome: dict = {}

        def idle_after_response() -> None:
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                outcome["idle"] = _recv_until_closed(sock, 5)

        def silent() -> None:
            with socket.create_connection(("127.0.0.1", port)) as sock:
                outcome["silent"] = _recv_until_closed(sock, 6)

        def trickle(request: bytes, name: str) -> None:
            with socket.create_connection(("127.0.0.1", port)) as sock:
                start = time.monotonic()
                try:
                    for i in range(len(request)):  # one byte every 50 ms: never done within the deadline
                        sock.sendall(request[i:i + 1])
                        time.sleep(0.05)
                        if time.monotonic() - start > 6:
                            break
                    outcome[name] = (b"sent all", float("inf"))
                except OSError:
                    outcome[name] = (b"", time.monotonic() - start)

        body = json.dumps({"texts": ["good"] * 40}).encode()
        jobs = [threading.Thread(target=idle_after_response), threading.Thread(target=silent),
                threading.Thread(target=trickle, args=(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 40,
                                                       "slow headers")),
                threading.Thread(target=trickle, args=(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: "
                                                       b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
                                                       + body, "slow body"))]
        for job in jobs:
            job.start()
        for job in jobs:
            job.join(15)
        assert httpx.get(f"{url}/healthz").status_code == 200  # the server itself is fine
    reply, idle_closed = outcome["idle"]
    assert reply.startswith(b"HTTP/1.1 200") and idle_closed < request_timeout  # closed by the keep-alive timeout
    assert outcome["silent"][0] == b"" and request_timeout - 0.2 < outcome["silent"][1] < request_timeout + 2
    # Writes fail once the server has closed: the trickling clients are cut off well before they finish.
    for name in ("slow headers", "slow body"):
        assert outcome[name][1] < request_timeout + 2.5, (name, outcome[name])


def test_connections_beyond_the_limit_get_503():
    with ServerThread(create_app(FakeClassifier()), max_connections=3) as url:
        port = int(url.rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        try:
            time.sleep(0.1)
            with httpx.Client() as c:
                busy = c.get(f"{url}/healthz")
        finally:
            for sock in idle:
                sock.close()
        time.sleep(0.1)
        after = httpx.get(f"{url}/healthz")
    assert busy.status_code == 503 and after.status_code == 200


# --- fuzzed bodies (hypothesis) -----------------------------------------------------------------

FUZZ_KEY = "fuzz-key"
FUZZ_LIMITS = {"max_texts": 6, "max_chars": 40, "max_body_bytes": 2048, "max_mc_passes": 3}
any_char = st.characters(exclude_categories=())  # surrogates too: JSON may escape them ("\ud800")
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(any_char, max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=6)
                           | st.dictionaries(st.text(any_char, max_size=8), inner, max_size=6), max_leaves=25)
texts = st.lists(st.text(any_char, max_size=FUZZ_LIMITS["max_chars"]), max_size=FUZZ_LIMITS["max_texts"])
valid_requests = st.fixed_dictionaries({"texts": texts}, optional={
    "mc_dropout": st.none() | st.integers(1, FUZZ_LIMITS["max_mc_passes"]),
    "threshold": st.none() | st.floats(0.001, 1.0), "dropout_rate": st.none() | st.floats(0.0, 0.9)})
near_requests = st.fixed_dictionaries({"texts": json_values | st.lists(json_values, max_size=8) | texts}, optional={
    "mc_dropout": json_values, "threshold": json_values, "dropout_rate": json_values, "colour": json_values})
content_types = st.none() | st.sampled_from(["application/json", "application/json; charset=utf-8",
                                             "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                                             "text/plain", "application/vnd.api+json", "application/",
                                             ";;;", "application/json; charset=utf-16"]) \
    | st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b""))


@pytest.fixture(scope="module")
def fuzz_client(tiny_clf):
    with TestClient(create_app(tiny_clf, api_key=FUZZ_KEY, **FUZZ_LIMITS), headers={"X-API-Key": FUZZ_KEY}) as c:
        yield c
        # The server keeps answering after everything the properties sent.
        assert c.get("/healthz").json()["queued_texts"] == 0
        check_results(c, {"texts": [POSITIVE, NEGATIVE]}, c.post("/v1/classify", json={"texts": [POSITIVE, NEGATIVE]}),
                      tiny_clf)


def check_results(client: TestClient, body, response: httpx.Response, clf) -> None:
    """Never 5xx; a 4xx has a message; a 200 has one result per text, in input order, equal to
    the classifier's own `predict_proba` (MC-dropout results: a distribution and its spread)."""
    assert response.status_code < 500, response.text
    if response.status_code != 200:
        assert 400 <= response.status_code < 500
        detail = response.json()["detail"]
        assert isinstance(detail, str) and detail
        return
    results = response.json()["results"]
    assert len(results) == len(body["texts"])
    if not results:
        return
    got = np.array([[r["probabilities"][c] for c in clf.classes_] for r in results])
    assert [r["label"] for r in results] == [clf.classes_[i] for i in got.argmax(1)]
    if body.get("mc_dropout") is None:
        np.testing.assert_allclose(got, clf.predict_proba(body["texts"]), atol=1e-5)
    else:
        np.testing.assert_allclose(got.sum(1), 1, atol=1e-4)
        assert all(set(r["std"]) == set(clf.classes_) for r in results)


def post_json(client: TestClient, body) -> httpx.Response:
    return client.post("/v1/classify", content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})


@pytest.mark.parametrize("profile", PROFILES)
def test_fuzz_any_json_body_is_answered_without_5xx_and_valid_ones_in_order(profile, fuzz_client, tiny_clf):
    @settings(settings.get_profile(profile))
    @given(body=json_values | near_requests | valid_requests)
    def any_json(body) -> None:
        check_results(fuzz_client, body, post_json(fuzz_client, body), tiny_clf)

    @settings(settings.get_profile(profile))
    @given(body=valid_requests)
    def valid(body) -> None:
        response = post_json(fuzz_client, body)
        assert response.status_code == 200, response.text
        check_results(fuzz_client, body, response, tiny_clf)

    any_json()
    valid()


@pytest.mark.parametrize("profile", PROFILES)
def test_fuzz_any_bytes_content_type_and_key_header_without_5xx(profile, fuzz_client, tiny_clf):
    prefixes = st.sampled_from([b"", b'{"texts": ["', b'{"texts": [', b"{", b"[", b'"', b"\xef\xbb\xbf{"])

    @settings(settings.get_profile(profile))
    @given(prefix=prefixes, body=st.binary(max_size=2200), content_type=content_types)
    def any_bytes(prefix: bytes, body: bytes, content_type) -> None:
        headers = {} if content_type is None else {"Content-Type": content_type}
        response = fuzz_client.post("/v1/classify", content=prefix + body, headers=headers)
        assert response.status_code < 500, response.text
        if response.status_code == 200:  # rare: the bytes happened to be a valid request
            check_results(fuzz_client, json.loads(prefix + body), response, tiny_clf)

    @settings(settings.get_profile(profile))
    @given(key=st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
           bearer=st.booleans())
    def any_key(key: bytes, bearer: bool) -> None:
        headers = {"Authorization": b"Bearer " + key, "X-API-Key": b""} if bearer else {"X-API-Key": key}
        response = fuzz_client.post("/v1/classify", json={"texts": ["good"]}, headers=headers)
        assert response.status_code == (200 if key.strip() == FUZZ_KEY.encode() else 401), response.text

    any_bytes()
    any_key()
