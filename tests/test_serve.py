"""The REST app: results, micro-batching, a responsive event loop, limits and errors, auth, page."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn

from llmclf.engines.base import MCDropoutResult
from llmclf.serve import MicroBatcher, create_app
from llmclf.serve.batching import BatcherClosedError
from llmclf.serve.server import uvicorn_config
from tiny_classifier import NEGATIVE, POSITIVE, tiny_classifier_dir


class FakeClassifier:
    """Deterministic stand-in: p(pos) grows with the number of 'good' in a text; counts forward calls."""

    classes_ = ["neg", "pos"]

    def __init__(self, delay: float = 0.0, gate: threading.Event | None = None) -> None:
        self.delay, self.gate = delay, gate
        self.batches: list[list[str]] = []
        self.started = threading.Event()

    def _probs(self, texts: list[str]) -> np.ndarray:
        p = np.array([min(0.95, 0.1 + 0.2 * t.count("good")) for t in texts])
        return np.stack([1 - p, p], axis=1)

    def predict_proba(self, texts, batch_size=32):
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(10), "test gate never opened"
        if any(t == "boom" for t in texts):
            raise RuntimeError("kaboom")
        time.sleep(self.delay)
        self.batches.append(list(texts))
        return self._probs(texts)

    def predict_mc_dropout(self, texts, passes=5, threshold=None, batch_size=32, dropout_rate=None, seed=None):
        self.batches.append(list(texts))
        mean = self._probs(texts)
        std = np.full_like(mean, 0.01 * passes)
        return MCDropoutResult([self.classes_[i] for i in mean.argmax(1)], mean, std, [True] * len(texts),
                               self.classes_, passes, threshold)

    def info(self):
        return {"labels": self.classes_, "backbone": "fake", "engine": "none", "max_length": 8,
                "metrics": {"validation": {"loss": float("nan"), "accuracy": 1.0}}, "test_metrics": None}


def client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=30)


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def tiny_clf(tmp_path_factory, shared_dir):
    from llmclf.classifier import load_classifier

    return load_classifier(tiny_classifier_dir(tmp_path_factory, shared_dir), precision="float32")


# --- results ----------------------------------------------------------------------------------


def test_classify_gives_the_classifiers_probabilities_in_input_order(tiny_clf):
    texts = [POSITIVE, NEGATIVE, "great", "sad", NEGATIVE + " " + NEGATIVE]

    async def go():
        async with client(create_app(tiny_clf)) as c:
            return await c.post("/v1/classify", json={"texts": texts})

    r = run(go())
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    expected = tiny_clf.predict_proba(texts)
    assert [x["label"] for x in results] == tiny_clf.predict(texts)
    assert results[0]["label"] == "pos" and results[1]["label"] == "neg"
    got = np.array([[x["probabilities"][c] for c in tiny_clf.classes_] for x in results])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert all(set(x) == {"label", "probabilities"} for x in results)


def test_concurrent_requests_share_one_forward_pass_and_keep_their_own_results():
    fake = FakeClassifier(delay=0.05)
    app = create_app(fake, max_batch=64, max_wait_ms=50)
    bodies = [{"texts": ["good " * (i % 4) + f"#{i}", f"bad #{i}"]} for i in range(12)]

    async def go():
        async with client(app) as c:
            responses = await asyncio.gather(*[c.post("/v1/classify", json=b) for b in bodies])
            return responses, (await c.get("/healthz")).json()

    responses, health = run(go())
    assert [r.status_code for r in responses] == [200] * 12
    assert len(fake.batches) == 1 and len(fake.batches[0]) == 24  # 12 requests, one forward pass
    assert health["batches"] == 1 and health["largest_batch"] == 24 and health["texts"] == 24
    for body, r in zip(bodies, responses, strict=True):
        expected = fake._probs(body["texts"])[:, 1]
        assert [x["probabilities"]["pos"] for x in r.json()["results"]] == pytest.approx(expected)


def test_batches_never_exceed_max_batch():
    fake = FakeClassifier(delay=0.01)
    app = create_app(fake, max_batch=4, max_wait_ms=20)

    async def go():
        async with client(app) as c:
            return await asyncio.gather(*[c.post("/v1/classify", json={"texts": [f"t{i}", "u"]}) for i in range(9)])

    assert all(r.status_code == 200 for r in run(go()))
    sizes = [len(b) for b in fake.batches]
    assert sum(sizes) == 18 and max(sizes) <= 4 and len(sizes) >= 5


def test_concurrent_real_requests_match_single_ones(tiny_clf):
    texts = [POSITIVE, NEGATIVE, "great great", "so sad today", "neutral words here", "x" * 300]

    async def go():
        async with client(create_app(tiny_clf, max_wait_ms=30)) as c:
            return await asyncio.gather(*[c.post("/v1/classify", json={"texts": [t]}) for t in texts])

    got = np.array([[r.json()["results"][0]["probabilities"][c] for c in tiny_clf.classes_] for r in run(go())])
    np.testing.assert_allclose(got, tiny_clf.predict_proba(texts), atol=1e-5)


def test_the_event_loop_answers_while_inference_runs():
    gate = threading.Event()
    fake = FakeClassifier(gate=gate)
    app = create_app(fake)

    async def go():
        async with client(app) as c:
            pending = asyncio.create_task(c.post("/v1/classify", json={"texts": ["good"]}))
            while not fake.started.is_set():
                await asyncio.sleep(0.01)
            # Inference is blocked on the gate: these must still be answered.
            health = await asyncio.wait_for(c.get("/healthz"), timeout=5)
            page = await asyncio.wait_for(c.get("/"), timeout=5)
            gate.set()
            return health, page, await pending

    health, page, done = run(go())
    assert health.status_code == 200 and page.status_code == 200 and done.status_code == 200


def test_mc_dropout_and_threshold(tiny_clf):
    async def go():
        async with client(create_app(tiny_clf, dropout_rate=0.2)) as c:
            mc = await c.post("/v1/classify", json={"texts": [POSITIVE, NEGATIVE], "mc_dropout": 4, "threshold": 0.99})
            one = await c.post("/v1/classify", json={"texts": [POSITIVE], "threshold": 0.01})
            return mc, one

    mc, one = run(go())
    assert mc.status_code == 200, mc.text
    for x in mc.json()["results"]:
        assert set(x) == {"label", "probabilities", "std", "confident"}
        assert sum(x["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert max(x["std"].values()) > 0  # dropout 0.2 was active
    assert [x["label"] for x in mc.json()["results"]] == ["pos", "neg"]
    assert one.json()["results"][0]["confident"] is True and "std" not in one.json()["results"][0]


def test_mc_dropout_requests_are_batched_apart_from_plain_ones():
    fake = FakeClassifier()
    app = create_app(fake, max_wait_ms=30)

    async def go():
        async with client(app) as c:
            return await asyncio.gather(c.post("/v1/classify", json={"texts": ["a"]}),
                                        c.post("/v1/classify", json={"texts": ["good"], "mc_dropout": 3}),
                                        c.post("/v1/classify", json={"texts": ["b"]}))

    plain1, mc, plain2 = run(go())
    assert sorted(map(sorted, fake.batches)) == [["a", "b"], ["good"]]
    assert mc.json()["results"][0]["std"]["pos"] == pytest.approx(0.03)
    assert "std" not in plain1.json()["results"][0] and plain2.status_code == 200


# --- limits and errors -------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "where"), [
    (b"{", "malformed JSON"),
    (b'{"texts": ["a", 2]}', "texts[1]"),
    (b'{"texts": "just one string"}', "texts"),
    (b'{"texts": null}', "texts"),
    (b'{"text": ["a"]}', "texts: field required"),
    (b"[]", "JSON object"),
    (b'"texts"', "JSON object"),
    (b'{"texts": ["a"], "mc_dropout": 0}', "mc_dropout"),
    (b'{"texts": ["a"], "mc_dropout": "3"}', "mc_dropout"),
    (b'{"texts": ["a"], "mc_dropout": 51}', "mc_dropout"),
    (b'{"texts": ["a"], "threshold": 0}', "threshold"),
    (b'{"texts": ["a"], "threshold": 1.5}', "threshold"),
    (b'{"texts": ["a"], "dropout_rate": 1}', "dropout_rate"),
    (b'{"texts": ["a"], "colour": "red"}', "unknown field"),
    (b"\xff\xfe not utf-8", ""),
    (b'{"texts": ["caf\xe9"]}', "the body is not UTF-8"),  # Latin-1
    (b"[" * 100_000, "nested too deeply"),  # json's RecursionError, once a 400 "error parsing the body"
])
def test_bad_requests_are_422_with_a_message(body, where):
    async def go():
        async with client(create_app(FakeClassifier())) as c:
            return await c.post("/v1/classify", content=body, headers={"Content-Type": "application/json"})

    r = run(go())
    assert r.status_code == 422, r.text
    assert where in r.json()["detail"]


def test_limits_are_413():
    app = create_app(FakeClassifier(), max_texts=3, max_body_bytes=1000)

    async def chunked():
        yield b'{"texts": ["'
        for _ in range(20):
            yield b"x" * 100
        yield b'"]}'

    async def go():
        async with client(app) as c:
            many = await c.post("/v1/classify", json={"texts": ["a", "b", "c", "d"]})
            big = await c.post("/v1/classify", json={"texts": ["x" * 2000]})
            streamed = await c.post("/v1/classify", content=chunked(), headers={"Content-Type": "application/json"})
            ok = await c.post("/v1/classify", json={"texts": ["a", "b", "c"]})
            return many, big, streamed, ok

    many, big, streamed, ok = run(go())
    assert many.status_code == 413 and "limit is 3" in many.json()["detail"]
    assert big.status_code == 413 and "1000 bytes" in big.json()["detail"]
    assert "content-length" not in streamed.request.headers and streamed.status_code == 413
    assert ok.status_code == 200


def test_api_key():
    app = create_app(FakeClassifier(), api_key="s3cret")

    async def go():
        async with client(app) as c:
            body = {"texts": ["good"]}
            return {
                "none": await c.post("/v1/classify", json=body),
                "wrong": await c.post("/v1/classify", json=body, headers={"Authorization": "Bearer nope"}),
                "bad_json_no_key": await c.post("/v1/classify", content=b"{", headers={"X-API-Key": "x"}),
                "bearer": await c.post("/v1/classify", json=body, headers={"Authorization": "Bearer s3cret"}),
                "x_api_key": await c.post("/v1/classify", json=body, headers={"X-API-Key": "s3cret"}),
                "model_none": await c.get("/v1/model"),
                "model_ok": await c.get("/v1/model", headers={"X-API-Key": "s3cret"}),
                "health": await c.get("/healthz"),
                "page": await c.get("/"),
            }

    r = run(go())
    for name in ("none", "wrong", "bad_json_no_key", "model_none"):
        assert r[name].status_code == 401, name
        assert "API key" in r[name].json()["detail"] and r[name].headers["www-authenticate"] == "Bearer"
    assert r["none"].json()["detail"].startswith("missing") and r["wrong"].json()["detail"].startswith("wrong")
    for name in ("bearer", "x_api_key", "model_ok", "health", "page"):
        assert r[name].status_code == 200, name
    assert r["model_ok"].json()["serving"]["auth"] is True
    assert '"auth": true' in r["page"].text  # the page shows its key field


def test_inference_errors_fail_only_their_request_and_the_server_goes_on(caplog):
    fake = FakeClassifier()
    app = create_app(fake, max_wait_ms=30)

    async def go():
        async with client(app) as c:
            bad, good = await asyncio.gather(c.post("/v1/classify", json={"texts": ["boom"]}),
                                             c.post("/v1/classify", json={"texts": ["good"]}))
            return bad, good, await c.post("/v1/classify", json={"texts": ["good good"]})

    bad, good, after = run(go())
    assert bad.status_code == 500 and "inference failed" in bad.json()["detail"]
    assert "kaboom" not in bad.json()["detail"] and "kaboom" in caplog.text  # details stay in the server log
    assert good.status_code == 200 and after.status_code == 200


def test_odd_texts_do_not_crash_the_server(tiny_clf):
    odd = ["", " ", "\n\t", "😀🎉 émoji", "\x00\x01 control", "\ud800 lone surrogate", "y" * 200_000, "<script>"]

    def post(c, texts):  # json.dumps escapes the lone surrogate as JSON allows ("\\ud800")
        return c.post("/v1/classify", content=json.dumps({"texts": texts}),
                      headers={"Content-Type": "application/json"})

    async def go():
        async with client(create_app(tiny_clf, max_chars=len(odd[6]))) as c:
            each = [await post(c, [t]) for t in odd]
            together = await post(c, odd)
            empty = await c.post("/v1/classify", json={"texts": []})
            return each, together, empty, await c.get("/healthz")

    each, together, empty, health = run(go())
    assert [r.status_code for r in each] == [200] * len(odd), [r.text[:200] for r in each]
    assert together.status_code == 200 and len(together.json()["results"]) == len(odd)
    assert empty.status_code == 200 and empty.json() == {"results": []}
    assert health.json()["status"] == "ok"


def test_a_full_queue_is_503_with_retry_after():
    gate = threading.Event()
    fake = FakeClassifier(gate=gate)
    app = create_app(fake, max_batch=2, max_queue=2, max_wait_ms=0)

    async def go():
        async with client(app) as c:
            first = asyncio.create_task(c.post("/v1/classify", json={"texts": ["a", "b"]}))
            while not fake.started.is_set():
                await asyncio.sleep(0.01)
            waiting = asyncio.create_task(c.post("/v1/classify", json={"texts": ["c", "d"]}))
            while app.state.batcher.queued_texts < 2:
                await asyncio.sleep(0.01)
            busy = await c.post("/v1/classify", json={"texts": ["e"]})
            gate.set()
            return busy, await first, await waiting

    busy, first, waiting = run(go())
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1" and "busy" in busy.json()["detail"]
    assert first.status_code == 200 and waiting.status_code == 200


def test_closing_the_batcher_finishes_queued_requests_and_refuses_new_ones():
    release = threading.Event()

    async def closing():
        batcher = MicroBatcher(lambda key, texts: (release.wait(10), [t.upper() for t in texts])[1], max_batch=1)
        running = asyncio.create_task(batcher.submit(["x"]))
        waiting = asyncio.create_task(batcher.submit(["y"]))
        while batcher.queued_texts != 1:  # "x" runs, "y" waits
            await asyncio.sleep(0.01)
        closed = asyncio.create_task(batcher.close(timeout=10))
        await asyncio.sleep(0.05)
        with pytest.raises(BatcherClosedError):  # closing: no new requests
            await batcher.submit(["z"])
        release.set()
        await closed
        return await running, await waiting

    try:
        assert run(closing()) == (["X"], ["Y"])  # both finished before the worker stopped
    finally:
        release.set()


def test_closing_the_batcher_gives_up_after_its_timeout():
    release = threading.Event()

    async def closing():
        batcher = MicroBatcher(lambda key, texts: (release.wait(10), texts)[1], max_batch=1)
        running = asyncio.create_task(batcher.submit(["x"]))
        waiting = asyncio.create_task(batcher.submit(["y"]))
        while batcher.queued_texts != 1:
            await asyncio.sleep(0.01)
        started = time.monotonic()
        await batcher.close(timeout=0.2)
        assert time.monotonic() - started < 2
        for task in (running, waiting):
            with pytest.raises(BatcherClosedError):
                await task

    try:
        run(closing())
    finally:
        release.set()


# --- info, docs, page --------------------------------------------------------------------------


def test_model_info_docs_and_page(tiny_clf):
    async def go():
        async with client(create_app(tiny_clf, max_texts=7)) as c:
            return [await c.get(p) for p in ("/v1/model", "/docs", "/openapi.json", "/", "/nowhere",
                                             "/docs-assets/swagger-ui-bundle.js")]

    info, docs, schema, page, missing, swagger_js = run(go())
    body = info.json()
    assert body["labels"] == ["neg", "pos"] and body["engine"] == "scratch" and body["max_length"] >= 1
    assert "backbone" in body and "metrics" in body and body["serving"]["max_texts"] == 7
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assets = re.findall(r"""(?:src|href)=["']?([^"' >]+)""", docs.text)  # Swagger UI from this server, no CDN
    assert assets and all(a.startswith("http://test/docs-assets/") for a in assets), assets
    assert swagger_js.status_code == 200 and "SwaggerUIBundle" in swagger_js.text
    assert "/v1/classify" in schema.json()["paths"]
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text)  # no external assets
    config = json.loads(re.search(r'id="llmclf-config" type="application/json">(.*?)</script>', page.text).group(1))
    assert config["labels"] == ["neg", "pos"] and config["auth"] is False and config["max_texts"] == 7
    assert missing.status_code == 404 and missing.json() == {"detail": "Not Found"}


def test_model_info_is_strict_json_even_with_nan_metrics():
    async def go():
        async with client(create_app(FakeClassifier())) as c:
            return await c.get("/v1/model")

    r = run(go())
    assert r.status_code == 200 and r.json()["metrics"]["validation"] == {"loss": None, "accuracy": 1.0}


# --- a real socket ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving `app` on a free loopback port in a background thread, with the settings of
    `llmclf serve` (`options` go to `uvicorn_config`)."""

    def __init__(self, app, **options) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn_config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    **options))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def test_over_tcp_concurrent_clients_are_batched_and_limits_hold():
    fake = FakeClassifier(delay=0.1)
    with ServerThread(create_app(fake, max_body_bytes=10_000, max_wait_ms=20)) as url:
        results: dict[int, httpx.Response] = {}

        def call(i: int) -> None:
            with httpx.Client(timeout=30) as c:
                results[i] = c.post(f"{url}/v1/classify", json={"texts": ["good " * (i % 3) + str(i)]})

        threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with httpx.Client(timeout=30) as c:
            big = c.post(f"{url}/v1/classify", json={"texts": ["x" * 20_000]})
            broken = c.post(f"{url}/v1/classify", content=b'{"texts": [', headers={"Content-Type": "application/json"})
            still = c.post(f"{url}/v1/classify", json={"texts": ["good"]})
    assert all(r.status_code == 200 for r in results.values()) and len(results) == 16
    for i, r in results.items():
        assert r.json()["results"][0]["probabilities"]["pos"] == pytest.approx(0.1 + 0.2 * (i % 3))
    assert len(fake.batches) < 16  # requests shared forward passes
    assert big.status_code == 413 and broken.status_code == 422 and still.status_code == 200
