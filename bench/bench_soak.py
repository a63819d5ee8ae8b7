"""Soak test of `llmclf serve` under hostile load: loopback only, bounded in time and clients.

Starts `llmclf serve` on a free 127.0.0.1 port (the tiny test classifier, built once under
runs/bench_models/, or `--model DIR`), then runs `--clients` concurrent clients for `--seconds`:
most send a mix of valid requests (1-4 texts), malformed bodies (broken or wrong JSON, random
bytes, deep nesting, wrong content type) and oversized ones (body over --max-body-bytes with and
without Content-Length, too many texts, too long a text); one client in eight is a slow sender
that writes its request byte by byte over a raw socket, and now and then stalls mid-body until
the server's --request-timeout closes the connection. At the end the server gets SIGTERM.

Prints requests answered, counts by kind and status, p50/p99 latency of the valid requests, the
server's RSS at start and end (psutil) and its growth, and the server's exit code; writes the same
to runs/bench_soak.json. Exits 1 on any 5xx, a valid request not answered 200, or a server crash.

    python bench/bench_soak.py [--seconds 60] [--clients 32] [--model DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import numpy as np
import psutil
from bench_serve import Server
from bench_training_loop import cpu_name

REPO = Path(__file__).resolve().parents[1]
MODELS_DIR = REPO / "runs" / "bench_models"
MAX_BODY_BYTES, MAX_TEXTS, MAX_CHARS, REQUEST_TIMEOUT = 1 << 20, 256, 100_000, 10.0
WORDS = "great wonderful happy awful terrible sad today the a movie was really not".split()


def tiny_model() -> Path:
    """The tests' tiny GPT-2 classifier (tests/tiny_classifier.py), built once under runs/bench_models/."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_classifier import tiny_classifier_dir

    class _Base:  # tiny_classifier_dir only asks its factory for a base directory
        @staticmethod
        def getbasetemp() -> Path:
            return MODELS_DIR

    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    shared = Path(os.environ.get("LLMCLF_SHARED", REPO.parent / "shared"))
    return tiny_classifier_dir(_Base(), shared)  # type: ignore[arg-type]


def text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))


def malformed(rng: random.Random) -> tuple[bytes, str]:
    """A body the server must refuse with a 4xx, and its content type."""
    choice = rng.randrange(8)
    if choice == 0:
        return b'{"texts": ["unterminated', "application/json"
    if choice == 1:
        return json.dumps({"texts": [1, None, {"a": 2}]}).encode(), "application/json"
    if choice == 2:
        return rng.randbytes(rng.randint(1, 2000)), "application/json"
    if choice == 3:
        return b"[" * 50_000 + b"]" * 50_000, "application/json"  # deep nesting
    if choice == 4:
        return json.dumps({"texts": ["a"], "mc_dropout": -3, "colour": "red"}).encode(), "application/json"
    if choice == 5:
        return b"texts=hello", "application/x-www-form-urlencoded"
    if choice == 6:
        return "\ufeff{\"texts\": \"not a list\"}".encode("utf-16"), "application/json"
    return json.dumps({"texts": [text(rng)]}).encode(), "text/plain"


async def oversized(client: httpx.AsyncClient, rng: random.Random) -> httpx.Response:
    """A request over one of the limits (body size, texts per request, characters per text): 413."""
    choice = rng.randrange(4)
    if choice == 0:
        body = json.dumps({"texts": ["x" * (MAX_BODY_BYTES + 10)]}).encode()
        return await client.post("/v1/classify", content=body, headers={"Content-Type": "application/json"})
    if choice == 1:
        async def chunks():  # no Content-Length: the server counts while it reads
            yield b'{"texts": ["'
            for _ in range(MAX_BODY_BYTES // 65536 + 2):
                yield b"y" * 65536
            yield b'"]}'
        return await client.post("/v1/classify", content=chunks(), headers={"Content-Type": "application/json"})
    if choice == 2:
        return await client.post("/v1/classify", json={"texts": ["a"] * (MAX_TEXTS + 1)})
    return await client.post("/v1/classify", json={"texts": ["ok", "z" * (MAX_CHARS + 1)]})


async def slow_sender(port: int, rng: random.Random, stall: bool) -> str:
    """A request written byte by byte on a raw socket (or stalling mid-body): its status, or what happened."""
    body = json.dumps({"texts": [text(rng)]}).encode()
    head = (f"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        for i in range(len(body)):
            if stall and i == len(body) // 2:
                data = await asyncio.wait_for(reader.read(), REQUEST_TIMEOUT + 15)  # until the server closes
                return "closed by server" if not data else "answered a stalled request"
            writer.write(body[i:i + 1])
            await writer.drain()
            await asyncio.sleep(0.01)
        data = await asyncio.wait_for(reader.read(), 60)
        return data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/1.1 ") else "no response"
    except (ConnectionError, asyncio.TimeoutError) as exc:
        return type(exc).__name__
    finally:
        writer.close()


async def soak(url: str, port: int, clients: int, seconds: float, seed: int = 0) -> dict:
    counts: dict[str, Counter] = defaultdict(Counter)
    latencies: list[float] = []
    wrong_results = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        async def mixed(rng: random.Random) -> None:
            nonlocal wrong_results
            while time.perf_counter() < deadline:
                kind = rng.choices(["valid", "malformed", "oversized"], weights=[70, 20, 10])[0]
                t0 = time.perf_counter()
                try:
                    if kind == "valid":
                        texts = [text(rng) for _ in range(rng.randint(1, 4))]
                        r = await client.post("/v1/classify", json={"texts": texts})
                        if r.status_code == 200:
                            latencies.append(time.perf_counter() - t0)
                            wrong_results += len(r.json()["results"]) != len(texts)
                    elif kind == "malformed":
                        body, content_type = malformed(rng)
                        r = await client.post("/v1/classify", content=body, headers={"Content-Type": content_type})
                    else:
                        r = await oversized(client, rng)
                    counts[kind][str(r.status_code)] += 1
                except httpx.HTTPError as exc:
                    counts[kind][type(exc).__name__] += 1

        async def slow(rng: random.Random) -> None:
            while time.perf_counter() < deadline:
                stall = rng.random() < 0.1
                counts["slow stalled" if stall else "slow"][await slow_sender(port, rng, stall)] += 1

        n_slow = max(1, clients // 8)
        await asyncio.gather(*[slow(random.Random(seed + i)) for i in range(n_slow)],
                             *[mixed(random.Random(seed + 1000 + i)) for i in range(clients - n_slow)])
    lat = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    by_status: Counter = Counter()
    for kind_counts in counts.values():
        by_status.update(kind_counts)
    return {"requests": sum(by_status.values()), "valid_ok": len(latencies), "wrong_result_counts": wrong_results,
            "by_kind": {k: dict(v) for k, v in sorted(counts.items())}, "by_status": dict(sorted(by_status.items())),
            "valid_latency_ms": {"p50": round(float(np.percentile(lat, 50)), 1),
                                 "p99": round(float(np.percentile(lat, 99)), 1)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="soak duration (bounded: at most 3600)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (at most 512)")
    parser.add_argument("--model", type=Path, default=None, help="a trained classifier directory "
                        "[default: the tests' tiny classifier, built once]")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_soak.json")
    args = parser.parse_args()
    if not 0 < args.seconds <= 3600 or not 2 <= args.clients <= 512:
        raise SystemExit("--seconds must be in (0, 3600] and --clients in [2, 512]")

    model = args.model or tiny_model()
    log = REPO / "runs" / "bench_soak_server.log"
    server = Server(model, max_batch=32, max_wait_ms=2.0, log=log)
    server.cmd += ["--request-timeout", str(REQUEST_TIMEOUT), "--max-connections", str(4 * args.clients)]
    with server:
        proc = psutil.Process(server.proc.pid)
        for _ in range(20):  # warm-up, so that the start RSS is the working size
            httpx.post(f"{server.url}/v1/classify", json={"texts": ["warm up"] * 32}, timeout=60)
        rss_start = proc.memory_info().rss
        started = time.perf_counter()
        result = asyncio.run(soak(server.url, server.port, args.clients, args.seconds))
        elapsed = time.perf_counter() - started
        alive = server.proc.poll() is None
        health = httpx.get(f"{server.url}/healthz", timeout=10).json() if alive else None
        rss_end = proc.memory_info().rss if alive else None
    exit_code = server.proc.returncode
    server_log = log.read_text(errors="replace")
    report = {"machine": f"{cpu_name()}, {os.cpu_count()} cores", "model": str(model), "clients": args.clients,
              "seconds": round(elapsed, 1), **result, "server_alive_at_end": alive, "health_at_end": health,
              "rss_mb": {"start": round(rss_start / 2**20, 1), "end": rss_end and round(rss_end / 2**20, 1),
                         "growth": rss_end and round((rss_end - rss_start) / 2**20, 1)},
              "server_exit_code_after_sigterm": exit_code,
              "server_log_tracebacks": server_log.count("Traceback")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    print(f"{report['machine']}; {args.clients} clients for {report['seconds']} s against {model}")
    print(f"requests answered: {result['requests']} ({result['valid_ok']} valid ones with 200, "
          f"{result['requests'] / elapsed:.0f}/s)")
    for kind, kind_counts in report["by_kind"].items():
        print(f"  {kind:13s} {kind_counts}")
    print(f"by status: {report['by_status']}")
    print(f"valid requests: p50 {result['valid_latency_ms']['p50']} ms, p99 {result['valid_latency_ms']['p99']} ms")
    rss = report["rss_mb"]
    print(f"server RSS: {rss['start']} MiB at start, {rss['end']} MiB at end (growth {rss['growth']} MiB)")
    print(f"server exit code after SIGTERM: {exit_code}; tracebacks in its log: {report['server_log_tracebacks']}")
    print(f"written to {args.out}")
    failures = [s for s in report["by_status"] if s.startswith("5")]
    failures += [f"valid request answered {s}" for s in report["by_kind"].get("valid", {}) if s != "200"]
    if result["wrong_result_counts"]:
        failures.append(f"{result['wrong_result_counts']} responses with the wrong number of results")
    if not alive or exit_code != 0 or report["server_log_tracebacks"]:
        failures.append("the server crashed, logged a traceback or did not exit 0")
    if failures:
        raise SystemExit(f"FAILED: {failures}")


if __name__ == "__main__":
    main()
