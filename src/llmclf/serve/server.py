"""Running the app under uvicorn for `llmclf serve`: bounded connections, headers and slow clients,
a graceful drain on SIGTERM/SIGINT, and the API key from a file.

On SIGTERM or SIGINT uvicorn stops accepting connections, closes idle ones, lets the requests in
flight finish (the batcher keeps running until they have), waits at most `shutdown_timeout` seconds
for them, and the process exits 0. A second SIGINT (Ctrl+C twice) stops at once.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import signal
from pathlib import Path
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from llmclf.errors import ConfigError, LlmclfError
from llmclf.serve import defaults

log = logging.getLogger("llmclf.serve")
_HEAD_END = re.compile(rb"\r?\n\r?\n")  # the blank line after the headers (h11 accepts bare LF too)


def read_api_key_file(path: str | Path) -> str:
    """The API key in the first line of `path` (surrounding whitespace removed)."""
    try:
        with open(path, encoding="utf-8") as f:
            key = f.readline().strip()
    except FileNotFoundError:
        raise ConfigError(f"--api-key-file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--api-key-file {path}: cannot read it ({type(exc).__name__}: "
                          f"{getattr(exc, 'strerror', None) or exc})") from None
    if not key:
        raise ConfigError(f"--api-key-file {path}: the first line is empty; write the key on it")
    return key


def resolve_api_key(api_key: str | None, from_env: bool,
                    api_key_file: str | Path | None) -> tuple[str | None, str | None]:
    """The server's API key, from `api_key` (given with --api-key, or from $LLMCLF_API_KEY when
    `from_env`) or the first line of `api_key_file`, and a warning to show (None if none). Two keys,
    or an empty one, is an error."""
    if api_key is not None:
        if api_key_file is not None:
            raise LlmclfError(f"two API keys given ({'$LLMCLF_API_KEY' if from_env else '--api-key'} and "
                              "--api-key-file): use one")
        if not api_key.strip():
            raise LlmclfError("--api-key is empty: give a key, or leave the option out to serve without one")
        if not from_env:
            return api_key, ("warning: a key given with --api-key can be read by every user of this machine in the "
                             "process list (ps); use $LLMCLF_API_KEY or --api-key-file instead")
        return api_key, None
    if api_key_file is not None:
        return read_api_key_file(api_key_file), None
    return None, None


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """A warning when the server listens beyond this machine without an API key, else None."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not api_key:
        return f"warning: serving on {host} without an API key: anyone who can reach it can use it"
    return None


class _HardenedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with two limits it lacks.

    - A deadline for receiving each request in full (headers and body), counted from the connection's
      start or from the previous response. uvicorn's keep-alive timer only runs between requests and
      stops at the first byte, so a client that connects and sends nothing, or trickles its request
      byte by byte (slowloris), would hold a connection forever.
    - A hard limit on the request line and headers (431). h11's `max_incomplete_event_size` only
      counts a head that is still incomplete, so a large head arriving in one read got through.
    """

    request_timeout = defaults.REQUEST_TIMEOUT
    max_header_bytes = defaults.MAX_HEADER_BYTES
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and self._head_size(data) > self.max_header_bytes:
            self._refuse_head()
            return
        super().data_received(data)
        self._watch()

    def _head_size(self, data: bytes) -> int:
        """Bytes of the next request's line and headers received so far (all of them once complete)."""
        buffered = self.conn.trailing_data[0] + data
        end = _HEAD_END.search(buffered)
        return end.end() if end else len(buffered)

    def _refuse_head(self) -> None:
        body = b"request line and headers exceed the server's --max-header-bytes (%d)" % self.max_header_bytes
        log.warning("refused a request whose headers exceed %d bytes (--max-header-bytes)", self.max_header_bytes)
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; "
                             b"charset=utf-8\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        super().connection_lost(exc)

    def _watch(self) -> None:
        """Arm the deadline while a request is awaited or being received; disarm it once it is in."""
        receiving = self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing()
        if receiving and self._deadline is None:
            self._deadline = self.loop.call_later(self.request_timeout, self._deadline_passed)
        elif not receiving and self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _deadline_passed(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            client = "{}:{}".format(*self.client) if self.client else "a client"
            log.warning("closed the connection of %s: no complete request within %g s (--request-timeout)",
                        client, self.request_timeout)
            self.transport.close()


def uvicorn_config(app: Any, *, host: str = "127.0.0.1", port: int = 8000, access_log: bool = True,
                   shutdown_timeout: float = defaults.SHUTDOWN_TIMEOUT,
                   keep_alive_timeout: float = defaults.KEEP_ALIVE_TIMEOUT,
                   request_timeout: float = defaults.REQUEST_TIMEOUT, max_header_bytes: int = defaults.MAX_HEADER_BYTES,
                   max_connections: int | None = defaults.MAX_CONNECTIONS, log_level: str = "info") -> uvicorn.Config:
    """uvicorn's settings for `app` with llmclf's limits (see `llmclf serve --help`).

    Args:
        shutdown_timeout: on SIGTERM/SIGINT, seconds the requests in flight have to finish.
        keep_alive_timeout: an idle keep-alive connection is closed after this many seconds.
        request_timeout: a connection that does not deliver a complete request within this many
            seconds (from its start or its previous response) is closed.
        max_header_bytes: the request line and headers together (431 beyond).
        max_connections: connections and requests at once; beyond, new requests get 503 (None: no limit).
    """
    for name, value in (("shutdown_timeout", shutdown_timeout), ("keep_alive_timeout", keep_alive_timeout),
                        ("request_timeout", request_timeout), ("max_header_bytes", max_header_bytes)):
        if not value > 0:
            raise ConfigError(f"{name} must be > 0, got {value}")
    protocol = type("HardenedH11Protocol", (_HardenedH11Protocol,),
                    {"request_timeout": request_timeout, "max_header_bytes": max_header_bytes})
    # h11 (subclassed above) even where httptools is installed.
    return uvicorn.Config(app, host=host, port=port, http=protocol, access_log=access_log, log_level=log_level,
                          timeout_graceful_shutdown=shutdown_timeout, timeout_keep_alive=keep_alive_timeout,
                          h11_max_incomplete_event_size=max_header_bytes, limit_concurrency=max_connections,
                          lifespan="on")


def run_server(config: uvicorn.Config) -> None:
    """Serve until SIGTERM or SIGINT, then drain gracefully and return (the process exits 0).

    uvicorn re-raises the stopping signal once it has drained, which would end the process with
    that signal instead of 0: during the run both signals go to the server's own handler, which
    only asks it to stop (and, for a second SIGINT, to stop at once)."""
    server = uvicorn.Server(config)
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, server.handle_exit) for sig in handled}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise SystemExit(3)  # uvicorn has logged why (e.g. the port is taken), as `uvicorn.run` does
