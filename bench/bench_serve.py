"""Load benchmark of `llmclf serve`: N concurrent clients for T seconds against a loopback server.

For each model (a GPT-2-small-sized classifier, scratch engine, random weights; and MiniLM-L6,
the packaged all-MiniLM-L6-v2 through the Transformers engine), the script builds a classifier
directory once (under runs/bench_models/; a 1-epoch fit on 64 SMS messages, the head only for
GPT-2), starts `llmclf serve` on a free 127.0.0.1 port in a subprocess, warms it up, then runs
each client count for `--seconds` (and at most `--max-requests` requests). Every client sends
`--texts-per-request` SMS messages per request, waits for the answer and sends the next.

Prints requests/s, texts/s, p50/p95/p99 latency, errors and the mean forward-batch size the
server reported; writes the same as JSON to runs/bench_serve.json. Only loopback traffic.

    python bench/bench_serve.py [--models gpt2-small,minilm] [--clients 1,16] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLMCLF_SHARED", REPO.parent / "shared"))
MODELS_DIR = REPO / "runs" / "bench_models"
MODELS = {"gpt2-small": "GPT-2 small (124M, scratch engine, random init)",
          "minilm": "all-MiniLM-L6-v2 (22M, hf engine)"}


def sms_texts() -> list[str]:
    """The 5,574 SMS Spam Collection messages (from $LLMCLF_SHARED/data/sms_spam)."""
    from llmclf.data.classification import read_sms_spam

    return read_sms_spam(SHARED / "data" / "sms_spam" / "sms_spam_collection.zip")["text"].tolist()


def build_classifier(name: str, max_length: int = 128) -> Path:
    """A saved classifier directory for `name` (built once; a short fit on 64 SMS messages)."""
    out = MODELS_DIR / name
    if (out / "config.json").is_file():
        return out
    from llmclf.classifier import make_classifier
    from llmclf.data.classification import LabelledTexts, read_sms_spam

    frame = read_sms_spam(SHARED / "data" / "sms_spam" / "sms_spam_collection.zip")
    sample = pd.concat([frame[frame["label"] == label].sample(32, random_state=0) for label in ("ham", "spam")])
    data = LabelledTexts(sample["text"].tolist(), sample["label"].tolist(), "sms sample")
    if name == "gpt2-small":
        tokenizer_dir = os.environ.get("LLMCLF_GPT2_TOKENIZER_DIR", str(SHARED / "tokenizers" / "gpt2"))
        clf = make_classifier("gpt2-small", "scratch", trainable="head", epochs=1, max_length=max_length,
                              log_every=10_000, model_options={"random_init": True, "tokenizer_dir": tokenizer_dir})
    elif name == "minilm":
        clf = make_classifier("all-minilm-l6-v2", "hf", epochs=1, max_length=max_length)
    else:
        raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    print(f"building {name} classifier in {out} ...", flush=True)
    clf.fit(data, data, out_dir=out, progress=False)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`llmclf serve` in a subprocess on a free loopback port; stopped on exit."""

    def __init__(self, model_dir: Path, max_batch: int, max_wait_ms: float, log: Path,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "llmclf", "serve", "--model", str(model_dir), "--host", "127.0.0.1",
                    "--port", str(self.port), "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms),
                    "--no-access-log", *extra_args]
        self.log = log

    def __enter__(self) -> Server:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(self.cmd, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.proc.kill()
        raise SystemExit(f"server did not start within 180 s:\n{self.log.read_text()}")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def load(url: str, texts: list[str], clients: int, seconds: float, max_requests: int,
               per_request: int, seed: int = 0) -> dict:
    """`clients` closed-loop clients until `seconds` pass or `max_requests` are sent."""
    rng = random.Random(seed)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    sent = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        before = (await client.get("/healthz")).json()
        start, cpu_start = time.perf_counter(), time.process_time()
        deadline = start + seconds

        async def worker() -> None:
            nonlocal sent
            while time.perf_counter() < deadline and sent < max_requests:
                sent += 1
                body = {"texts": rng.sample(texts, per_request)}
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/classify", json=body)
                    ok = r.status_code == 200 and len(r.json()["results"]) == per_request
                    key = "ok" if ok else f"HTTP {r.status_code}"
                except httpx.HTTPError as exc:
                    key = type(exc).__name__
                if key == "ok":
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors[key] = errors.get(key, 0) + 1

        await asyncio.gather(*[worker() for _ in range(clients)])
        elapsed = time.perf_counter() - start
        client_cpu = (time.process_time() - cpu_start) / elapsed
        after = (await client.get("/healthz")).json()
    lat = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    batches = after["batches"] - before["batches"]
    return {"clients": clients, "texts_per_request": per_request, "seconds": round(elapsed, 2),
            "requests": len(latencies), "errors": sum(errors.values()), "error_kinds": errors,
            "requests_per_s": round(len(latencies) / elapsed, 2),
            "texts_per_s": round(len(latencies) * per_request / elapsed, 1),
            "latency_ms": {f"p{q}": round(float(np.percentile(lat, q)), 1) for q in (50, 95, 99)}
            | {"max": round(float(lat.max()), 1)},
            "mean_batch_texts": round((after["texts"] - before["texts"]) / batches, 1) if batches else None,
            "client_cpu_cores": round(client_cpu, 2)}  # the load generator's own share of the machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gpt2-small,minilm", help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--clients", default="1,16", help="comma-separated concurrent client counts")
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of each run (bounded)")
    parser.add_argument("--max-requests", type=int, default=20_000, help="request cap of each run")
    parser.add_argument("--texts-per-request", type=int, default=1)
    parser.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch")
    parser.add_argument("--max-wait-ms", type=float, default=2.0, help="the server's --max-wait-ms")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_serve.json")
    args = parser.parse_args()
    if not 0 < args.seconds <= 600 or not 0 < args.max_requests <= 1_000_000:
        raise SystemExit("--seconds must be in (0, 600] and --max-requests in (0, 1e6]")

    texts = sms_texts()
    report = {"machine": f"{os.cpu_count()} cores", "load_average": os.getloadavg(), "max_batch": args.max_batch,
              "max_wait_ms": args.max_wait_ms, "runs": []}
    for name in args.models.split(","):
        model_dir = build_classifier(name)
        log = REPO / "runs" / f"bench_serve_{name}.log"
        with Server(model_dir, args.max_batch, args.max_wait_ms, log) as server:
            asyncio.run(load(server.url, texts, 4, 3, 200, args.texts_per_request))  # warm-up
            for clients in (int(c) for c in args.clients.split(",")):
                result = asyncio.run(load(server.url, texts, clients, args.seconds, args.max_requests,
                                          args.texts_per_request))
                result["model"] = name
                report["runs"].append(result)
                lat = result["latency_ms"]
                print(f"{MODELS[name]:48s} clients {clients:3d}: {result['requests_per_s']:7.1f} req/s "
                      f"{result['texts_per_s']:7.1f} texts/s  p50 {lat['p50']:7.1f} ms  p95 {lat['p95']:7.1f} ms  "
                      f"p99 {lat['p99']:7.1f} ms  errors {result['errors']}  "
                      f"mean batch {result['mean_batch_texts']}  ({result['requests']} requests)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
