"""Batch-prediction throughput: `llmclf predict --input FILE --output FILE` on 10,000 texts.

The input is the SMS Spam Collection's messages repeated to `--rows` rows (a CSV under
runs/bench_predict/). Each model's classifier directory is built once as in bench_serve.py
(GPT-2-small-sized scratch classifier, random weights; all-MiniLM-L6-v2 through the hf engine).
The command runs in a subprocess, as a user would run it; the script prints its own throughput
line (texts/s, inference and writing, without model loading) and the wall time of the command.

    python bench/bench_predict.py [--models gpt2-small,minilm] [--rows 10000] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from bench_serve import MODELS, REPO, build_classifier, sms_texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gpt2-small,minilm", help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--out-dir", type=Path, default=REPO / "runs" / "bench_predict")
    args = parser.parse_args()

    args.out_dir.mkdir(parents=True, exist_ok=True)
    texts = sms_texts()
    src = args.out_dir / f"sms_{args.rows}.csv"
    with open(src, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text"])
        writer.writerows((i, texts[i % len(texts)]) for i in range(args.rows))
    report = {"rows": args.rows, "load_average": os.getloadavg(), "runs": []}
    for name in args.models.split(","):
        model_dir = build_classifier(name)
        out = args.out_dir / f"predictions_{name}.csv"
        cmd = [sys.executable, "-m", "llmclf", "predict", "--model", str(model_dir), "--input", str(src),
               "--output", str(out), "--batch-size", str(args.batch_size), "--chunk-size", str(args.chunk_size),
               "--overwrite", "--restart", "--no-progress"]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr}")
        line = done.stdout.strip().splitlines()[-1]
        rate = float(re.search(r"\(([\d.]+) texts/s\)", line).group(1))
        with open(out, encoding="utf-8") as f:
            rows = sum(1 for _ in csv.reader(f)) - 1
        assert rows == args.rows, f"{out} has {rows} rows, expected {args.rows}"
        report["runs"].append({"model": name, "texts_per_s": rate, "command_seconds": round(wall, 1),
                               "batch_size": args.batch_size, "output_rows": rows})
        print(f"{MODELS[name]:48s} {args.rows} texts: {rate:8.1f} texts/s (inference + writing); "
              f"command wall time {wall:.1f} s including model loading\n    {line}", flush=True)
    (args.out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
