"""The REST app: `POST /v1/classify`, `GET /v1/model`, `GET /healthz`, the page at `/`, docs at `/docs`.

Requests are checked in this order, each failure a JSON `{"detail": ...}`:
API key (401) -> body size (413) -> JSON and fields (422) -> number of texts, characters per text (413)
-> queue room (503 + Retry-After). Inference runs in a worker thread through `MicroBatcher`, so the
event loop keeps answering. Every response carries a Content-Security-Policy allowing only the
server's own origin (the page's script and style are files under /static, not inline), `nosniff`,
`Referrer-Policy` and `X-Frame-Options`; cross-origin requests (CORS) are answered only for the
origins given. Limits on connections, headers and slow clients are uvicorn's: see `llmclf.serve.server`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import math
import re
from collections.abc import Sequence
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, Optional

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi_swagger import patch_fastapi
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmclf.engines.base import prediction_record
from llmclf.errors import ConfigError, LlmclfError
from llmclf.explain import explain
from llmclf.serve import defaults
from llmclf.serve.batching import BatcherClosedError, MicroBatcher, ServerBusyError

log = logging.getLogger("llmclf.serve")

PROTECTED_PREFIX = "/v1/"
EXPLAIN = ("explain",)  # the batcher's key for requests with "explain": true
MARKDOWN_SPECIAL = set("&<>\"'`*_[]()#!|\\~{}")
STATIC_FILES = {"index.js": "text/javascript", "index.css": "text/css"}  # the page's script and style
SWAGGER_UI_PARAMETERS = {"tryItOutEnabled": True, "persistAuthorization": True, "filter": True,
                         "displayRequestDuration": True, "validatorUrl": None}  # no call to validator.swagger.io


class ClassifyRequest(BaseModel):
    """Texts to classify; optionally Monte Carlo dropout passes and a confidence threshold."""

    model_config = ConfigDict(extra="forbid")

    texts: list[StrictStr] = Field(description="Texts to classify; results come back in this order.",
                                   examples=[["You won a free cruise! Reply YES", "See you at dinner"]])
    mc_dropout: Optional[StrictInt] = Field(
        None, ge=1, description="Forward passes with dropout active; adds `std` and `confident` to each result.")
    threshold: Optional[float] = Field(
        None, gt=0.0, le=1.0, description="A result is `confident` when its label's probability reaches this.")
    dropout_rate: Optional[float] = Field(
        None, ge=0.0, lt=1.0, description="With mc_dropout: override the model's dropout probability.")
    explain: Optional[StrictBool] = Field(
        None, description="Add per-token attributions for each text's label (`explanation`); costs about "
                          f"{defaults.EXPLAIN_STEPS} forward+backward passes per text, so at most the server's "
                          "max_explain_texts texts per request.")


class DecisionInfo(BaseModel):
    label: str = Field(description="The positive class: the label when its probability reaches the threshold.")
    threshold: float


class TokenAttributionResult(BaseModel):
    start: int = Field(description="The piece of the text: characters [start, end) (Unicode code points).")
    end: int
    text: str
    attribution: float


class ExplanationResult(BaseModel):
    """`llmclf.explain.Explanation`: what `explains` says, for the label of this result."""

    label: str
    method: str
    explains: str
    score: float
    baseline_score: float
    tokens: list[TokenAttributionResult]
    steps: Optional[int] = None
    blended: bool
    truncated: bool
    delta: Optional[float] = None


class ClassifyResult(BaseModel):
    label: str
    labels: Optional[list[str]] = Field(
        None, description="Multi-label models: every label whose probability reaches its threshold, most probable "
                          "first (`label` joins them).")
    probabilities: dict[str, float]
    std: Optional[dict[str, float]] = None
    confident: Optional[bool] = None
    decision_threshold: Optional[DecisionInfo] = Field(
        None, description="The model's binary decision threshold (tuned on validation), when it has one.")
    thresholds: Optional[dict[str, float]] = Field(
        None, description="Multi-label models: each label's threshold (tuned on validation).")
    explanation: Optional[ExplanationResult] = None


class ClassifyResponse(BaseModel):
    results: list[ClassifyResult]


def _json_safe(obj: Any) -> Any:
    """`obj` with NaN/inf as null and numpy scalars as Python numbers (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _error(status: int, detail: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"detail": detail, **extra}, status_code=status, headers=headers)


def _api_key_of(headers: dict[bytes, bytes]) -> bytes | None:
    """The key a request sends, as raw header bytes (any bytes, never decoded: nothing to fail on)."""
    auth = headers.get(b"authorization", b"").strip()
    if auth[:7].lower() == b"bearer ":
        return auth[7:].strip()
    key = headers.get(b"x-api-key")
    return key.strip() if key is not None else None


def _csp_hash(script: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"


def content_security_policy(openapi_url: str = "/openapi.json") -> str:
    """The CSP of every response: this origin only. The one inline script allowed (by its hash) is
    the Swagger UI start-up that FastAPI writes into /docs for these `SWAGGER_UI_PARAMETERS`."""
    docs = get_swagger_ui_html(openapi_url=openapi_url, title="", swagger_js_url="", swagger_css_url="",
                               swagger_favicon_url="", swagger_ui_parameters=SWAGGER_UI_PARAMETERS)
    inline = re.findall(r"<script>(.*?)</script>", bytes(docs.body).decode(), flags=re.S)
    scripts = " ".join(_csp_hash(s) for s in inline)
    return ("default-src 'self'; " f"script-src 'self' {scripts}; " "style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


class _SecurityHeaders:
    """ASGI middleware adding the CSP and the other browser-hardening headers to every response."""

    def __init__(self, app: ASGIApp, csp: str) -> None:
        self.app = app
        self.headers = [(b"content-security-policy", csp.encode()), (b"x-content-type-options", b"nosniff"),
                        (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY")]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []),
                                      *(h for h in self.headers if h[0] not in present)]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class _Guard:
    """ASGI middleware run before any body parsing: the API key on `/v1/` paths (401) and the
    request body size (413, without reading more than `max_body_bytes + 1` bytes)."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.max_body_bytes = app, max_body_bytes
        self.api_key = api_key.encode("utf-8", "surrogateescape") if api_key else None  # the bytes of $LLMCLF_API_KEY

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        if self.api_key and scope["path"].startswith(PROTECTED_PREFIX):
            given = _api_key_of(headers)
            if given is None or not hmac.compare_digest(given, self.api_key):  # constant time
                why = "missing API key" if given is None else "wrong API key"
                response = _error(401, f"{why}: send the header 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                                  headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        too_big = _error(413, f"request body exceeds {self.max_body_bytes} bytes (the server's --max-body-bytes); "
                              "send fewer or shorter texts per request")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await too_big(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await too_big(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _validation_message(errors: list[dict[str, Any]]) -> str:
    """One readable line for pydantic errors: `texts[2]: Input should be a valid string; ...`."""
    parts = []
    for err in errors[:5]:
        loc = [p for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            parts.append(f"malformed JSON ({err.get('ctx', {}).get('error', err.get('msg'))}); "
                         'send {"texts": ["..."]}')
            continue
        where = ""
        for p in loc:
            where += f"[{p}]" if isinstance(p, int) else (f".{p}" if where else str(p))
        msg = err.get("msg", "invalid")
        if err.get("type") == "missing" and where:
            msg = "field required"
        elif err.get("type") == "extra_forbidden":
            msg = "unknown field (allowed: texts, mc_dropout, threshold, dropout_rate, explain)"
        elif err.get("type") == "model_attributes_type":
            msg = 'the body must be a JSON object such as {"texts": ["..."]} (Content-Type: application/json)'
        parts.append(f"{where}: {msg}" if where else msg)
    if len(errors) > 5:
        parts.append(f"... and {len(errors) - 5} more")
    return "; ".join(parts)


def _markdown_text(text: str) -> str:
    """`text` as literal Markdown text: HTML and Markdown characters as character references, so that
    a label such as `<img src=x onerror=...>` in the API description (/docs) is shown, not rendered."""
    return "".join(f"&#{ord(c)};" if c in MARKDOWN_SPECIAL else c for c in text)


def _page(config: dict[str, Any]) -> str:
    html = resources.files("llmclf.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    # `<`, `>` and `&` as JSON escapes: a label such as `</script>` or `<!--` cannot end the data block.
    data = json.dumps(config).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return html.replace("__LLMCLF_CONFIG__", data)


def create_app(clf: Any, *, api_key: str | None = None, max_batch: int = defaults.MAX_BATCH,
               max_wait_ms: float = defaults.MAX_WAIT_MS, max_texts: int = defaults.MAX_TEXTS,
               max_body_bytes: int = defaults.MAX_BODY_BYTES, max_mc_passes: int = defaults.MAX_MC_PASSES,
               max_queue: int | None = None, dropout_rate: float | None = None, max_chars: int = defaults.MAX_CHARS,
               cors_origins: Sequence[str] = (), shutdown_timeout: float = defaults.SHUTDOWN_TIMEOUT) -> FastAPI:
    """The FastAPI app serving classifier `clf` (anything with `classes_`, `predict_proba`,
    `predict_mc_dropout` and `info`, e.g. from `load_classifier`).

    Args:
        api_key: when set, `/v1/*` needs `Authorization: Bearer KEY` or `X-API-Key: KEY`.
        max_batch: texts per forward pass; concurrent requests are merged up to this.
        max_wait_ms: how long the batcher waits for more requests once one arrives.
        max_texts: texts per request (413 beyond). max_body_bytes: request body size (413 beyond).
        max_mc_passes: the largest `mc_dropout` a request may ask for (422 beyond).
        max_queue: texts waiting for inference before requests get 503 (default `defaults.QUEUED_BATCHES` batches).
        dropout_rate: MC-dropout rate for requests that give none (for models trained without dropout).
        max_chars: characters per text (413 beyond, naming the text).
        cors_origins: origins whose pages may call the API from a browser (none: no CORS headers).
        shutdown_timeout: on shutdown, seconds the batcher may take to finish the requests it has queued.
    """
    for name, value in (("max_batch", max_batch), ("max_texts", max_texts), ("max_body_bytes", max_body_bytes),
                        ("max_mc_passes", max_mc_passes), ("max_chars", max_chars)):
        if value < 1:
            raise LlmclfError(f"{name} must be >= 1, got {value}")
    classes = list(clf.classes_)
    info = _json_safe(clf.info())
    try:  # e.g. a label "\ud800" (a lone surrogate, which JSON can spell) would fail every response
        json.dumps([classes, info], ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, TypeError, ValueError) as exc:
        raise ConfigError(f"the model's labels or config cannot be served as JSON ({exc}); labels: {classes!r}"
                          ) from None

    def run(key: Any, texts: list[str]) -> list[Any]:
        if key is None:
            return list(clf.predict_proba(texts, batch_size=max_batch))
        if key == EXPLAIN:
            probs = clf.predict_proba(texts, batch_size=max_batch)
            explained = explain(clf, texts, steps=defaults.EXPLAIN_STEPS, batch_size=max_batch, probabilities=probs)
            return [(p, e.to_dict()) for p, e in zip(probs, explained, strict=True)]
        _, passes, rate = key
        result = clf.predict_mc_dropout(texts, passes=passes, batch_size=max_batch, dropout_rate=rate)
        return list(zip(result.mean, result.std, strict=True))

    batcher = MicroBatcher(run, max_batch=max_batch, max_wait=max_wait_ms / 1000,
                           max_queue=max_queue if max_queue is not None else defaults.QUEUED_BATCHES * max_batch)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        batcher.start()
        yield
        await batcher.close(timeout=shutdown_timeout)

    app = FastAPI(title="llmclf", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  swagger_ui_oauth2_redirect_url=None,
                  description=f"Text classifier {_markdown_text(str(info.get('backbone', '')))}; labels: "
                              f"{', '.join(map(_markdown_text, classes))}. "
                              + ("Send the API key as `Authorization: Bearer KEY` or `X-API-Key: KEY`."
                                 if api_key else ""))
    app.state.batcher = batcher
    # The last added runs first: security headers on every response, then CORS (preflights need no key).
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "X-API-Key", "Content-Type"], max_age=600)
    app.add_middleware(_SecurityHeaders, csp=content_security_policy(app.openapi_url or "/openapi.json"))
    page = _page({"auth": bool(api_key), "labels": classes, "backbone": info.get("backbone", ""),
                  "max_texts": max_texts, "max_mc_passes": max_mc_passes, "max_chars": max_chars,
                  "long_text": info.get("long_text") or "truncate", "aggregate": info.get("aggregate")})
    static = {name: resources.files("llmclf.serve").joinpath("static", name).read_bytes() for name in STATIC_FILES}

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        return _error(422, _validation_message(exc.errors()), errors=_json_safe(errors))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        cause = exc.__cause__
        if exc.status_code == 400 and isinstance(cause, (UnicodeDecodeError, RecursionError)):
            # FastAPI's "There was an error parsing the body": say what was wrong, as for other bad JSON.
            why = "the body is not UTF-8" if isinstance(cause, UnicodeDecodeError) else "nested too deeply"
            return _error(422, f'malformed JSON ({why}); send {{"texts": ["..."]}}')
        return _error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return _error(500, f"internal error ({type(exc).__name__}); the server log has the details")

    # Swagger UI 5 from the installed fastapi-swagger package instead of FastAPI's CDN: /docs works offline.
    patch_fastapi(app, docs_url="/docs", redirect_from_root_to_docs=False, title="llmclf API",
                  swagger_js_url="/docs-assets/swagger-ui-bundle.js", swagger_css_url="/docs-assets/swagger-ui.css",
                  swagger_favicon_url="/docs-assets/favicon-32x32.png", swagger_ui_parameters=SWAGGER_UI_PARAMETERS)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str) -> Response:
        if name not in static:
            raise HTTPException(404, "Not Found")
        return Response(static[name], media_type=STATIC_FILES[name])

    @app.get("/healthz", summary="Liveness and batching counters")
    async def healthz() -> dict[str, Any]:
        s = batcher.stats
        return {"status": "ok", "queued_texts": batcher.queued_texts, "running_texts": batcher.running_texts,
                "batches": s.batches, "texts": s.texts,
                "largest_batch": s.largest_batch, "busy_seconds": round(s.busy_seconds, 3)}

    @app.get("/v1/model", summary="Labels, backbone, engine, max_length, training metrics, limits")
    async def model_info() -> dict[str, Any]:
        return {**info, "serving": {"max_texts": max_texts, "max_batch": max_batch, "max_mc_passes": max_mc_passes,
                                    "max_body_bytes": max_body_bytes, "max_chars": max_chars,
                                    "max_explain_texts": defaults.MAX_EXPLAIN_TEXTS,
                                    "explain_steps": defaults.EXPLAIN_STEPS, "auth": bool(api_key)}}

    @app.post("/v1/classify", response_model=ClassifyResponse, response_model_exclude_none=True,
              summary="Classify texts (results in input order)",
              responses={401: {"description": "Missing or wrong API key"},
                         413: {"description": "Too many texts, too long a text or too large a body"},
                         422: {"description": "Malformed JSON or invalid fields"},
                         503: {"description": "Queue full or shutting down; retry later"}})
    async def classify(request: ClassifyRequest) -> dict[str, Any]:
        n = len(request.texts)
        if n > max_texts:
            raise HTTPException(413, f"{n} texts in one request; the limit is {max_texts} (--max-texts): "
                                     "split them over several requests")
        long = [i for i, text in enumerate(request.texts) if len(text) > max_chars]
        if long:
            more = f" (and {len(long) - 1} more)" if len(long) > 1 else ""
            raise HTTPException(413, f"texts[{long[0]}]{more}: {len(request.texts[long[0]])} characters; the limit "
                                     f"is {max_chars} per text (--max-chars): shorten or split the text")
        if request.mc_dropout is not None and not getattr(clf, "supports_mc_dropout", True):
            raise HTTPException(422, "mc_dropout: this model is served from an ONNX export, whose graph has no "
                                     "dropout; serve the directory `llmclf train` wrote (--backend torch) for it")
        if request.mc_dropout is not None and request.mc_dropout > max_mc_passes:
            raise HTTPException(422, f"mc_dropout: {request.mc_dropout} passes asked; the limit is "
                                     f"{max_mc_passes} (--max-mc-passes)")
        if request.explain and request.mc_dropout is not None:
            raise HTTPException(422, "explain: explanations are of one deterministic pass's label; leave out "
                                     "mc_dropout")
        if request.explain and n > defaults.MAX_EXPLAIN_TEXTS:
            raise HTTPException(413, f"explain: {n} texts in one request; the limit with explanations is "
                                     f"{defaults.MAX_EXPLAIN_TEXTS} (each costs {defaults.EXPLAIN_STEPS} forward and "
                                     "backward passes): split them over several requests")
        rate = request.dropout_rate if request.dropout_rate is not None else dropout_rate
        key = None if request.mc_dropout is None else ("mc", request.mc_dropout, rate)
        key = EXPLAIN if request.explain else key
        try:
            rows = await batcher.submit(request.texts, key)
        except ServerBusyError as exc:
            raise HTTPException(503, f"server busy: {exc}", headers={"Retry-After": "1"}) from None
        except BatcherClosedError as exc:
            raise HTTPException(503, str(exc)) from None
        except LlmclfError as exc:
            raise HTTPException(422, str(exc)) from None
        except Exception as exc:
            log.exception("inference failed")
            # The message stays in the server log: exception texts can show paths and internals.
            raise HTTPException(500, f"inference failed ({type(exc).__name__}); the server log has the details"
                                ) from None
        results = []
        for row in rows:
            explanation = None
            if key == EXPLAIN:
                row, explanation = row
            mean, std = row if key not in (None, EXPLAIN) else (row, None)
            # ClassifyResult fixes the JSON field order: label, probabilities, std, confident.
            results.append(prediction_record(classes, mean, std, threshold=request.threshold,
                                             decision=getattr(clf, "decision", None),
                                             multi_label=getattr(clf, "label_thresholds", None)))
            if explanation is not None:
                results[-1]["explanation"] = _json_safe(explanation)
        return {"results": results}

    return app
