"""Several processes on one machine: what they cost and that they give the same results.

On the SMS course split (1,045 / 149 / 300):
1. train: 1 process x T threads against `--devices N` (N processes x T/N threads, gloo on CPU):
   wall seconds and test accuracy of each;
2. predict: N_TEXTS messages (the whole SMS collection, repeated) with the model from 1, 1 process
   against `--devices N`: texts/s, and whether the two output files are byte-identical;
3. restart: the run of 1 with `--devices N --max-restarts 1` and one worker SIGKILLed after optimizer
   step K (`LLMCLF_FAULT=step:K@1`): wall seconds against the uninterrupted run = the time a killed
   worker costs (the restart, the frozen-layer pass again, the steps since the last training state).

    python bench/bench_distributed.py [--model smollm2-135m] [--devices 2] [--threads 2] [--texts 10000]
        [--train-options "--trainable head --epochs 2"] [--kill-step 60]

Times are wall seconds of the whole command (model load included); print the CPU with `lscpu`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(os.environ.get("LLMCLF_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def run(args: list[str], threads: int, **env: str) -> tuple[float, str]:
    """(wall seconds, stdout) of `python -m llmclf ARGS`."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "llmclf", *args], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": str(threads), **env})
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"llmclf {' '.join(args[:1])} failed:\n{result.stderr[-4000:]}")
    return seconds, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="threads of the one process (split among N)")
    parser.add_argument("--texts", type=int, default=10_000)
    parser.add_argument("--train-options", default="--epochs 2 --batch-size 8")
    parser.add_argument("--kill-step", type=int, default=150, help="optimizer step after which rank 1 dies")
    parser.add_argument("--stages", default="train,predict,restart", help="which of train,predict,restart to run")
    args = parser.parse_args()
    stages = set(args.stages.split(","))
    n, per_worker = args.devices, max(1, args.threads // args.devices)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; 1 x {args.threads} threads vs {n} x "
          f"{per_worker} thread(s); model {args.model} ({args.train_options})", flush=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        run(["data", "sms-spam", "--out", str(tmp / "sms"), "--source",
             str(SHARED / "data/sms_spam/sms_spam_collection.zip")], args.threads)
        data = ["--train", str(tmp / "sms/train.csv"), "--val", str(tmp / "sms/validation.csv"),
                "--test", str(tmp / "sms/test.csv")]
        common = ["train", "--model", args.model, *data, *shlex.split(args.train_options), "--no-progress",
                  "--json", "--save-every", "50"]
        results = {}
        for label, extra, threads in (("1 process", [], args.threads), (f"{n} processes", ["--devices", str(n)],
                                                                          per_worker)):
            if "train" not in stages and (label != "1 process" or "predict" not in stages):
                continue  # predict needs the 1-process model
            out = tmp / label.replace(" ", "-")
            seconds, stdout = run([*common, "--out", str(out), *extra], threads)
            metrics = json.loads(stdout.strip().splitlines()[-1])
            results[label] = out
            print(f"train   {label:12s} {seconds:7.1f} s   test accuracy {metrics['test']['accuracy'] * 100:.2f} %",
                  flush=True)

        if "predict" in stages:
            predict(args, tmp, results["1 process"], n, per_worker)
        if "restart" in stages:
            restart(common, tmp, n, per_worker, args.kill_step)


def predict(args: argparse.Namespace, tmp: Path, model: Path, n: int, per_worker: int) -> None:
    """Texts/s of 1 process and of N, and whether their outputs are byte-identical."""
    with open(tmp / "sms/train.csv", encoding="utf-8") as f:
        texts = [row["text"] for row in csv.DictReader(f)]
    lines = [" ".join(texts[i % len(texts)].split()) for i in range(args.texts)]
    (tmp / "texts.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    outputs = []
    for label, extra, threads in (("1 process", [], args.threads), (f"{n} processes", ["--devices", str(n)],
                                                                      per_worker)):
        output = tmp / f"pred-{len(outputs)}.csv"
        seconds, _ = run(["predict", "--model", str(model), "--input", str(tmp / "texts.txt"),
                          "--output", str(output), "--no-progress", *extra], threads)
        outputs.append(output.read_bytes())
        print(f"predict {label:12s} {seconds:7.1f} s   {args.texts / seconds:6.1f} texts/s (model load included)",
              flush=True)
    print(f"predict outputs byte-identical: {outputs[0] == outputs[1]}")


def restart(common: list[str], tmp: Path, n: int, per_worker: int, kill_step: int) -> None:
    """Wall time of an uninterrupted N-process run against one whose rank 1 is killed, and whether
    the two final models are the same."""
    from safetensors.torch import load_file

    seconds_ok, _ = run([*common, "--out", str(tmp / "again"), "--devices", str(n), "--max-restarts", "1"],
                        per_worker)
    seconds_killed, _ = run([*common, "--out", str(tmp / "killed"), "--devices", str(n), "--max-restarts", "1"],
                            per_worker, LLMCLF_FAULT=f"step:{kill_step}@1")
    weights = ("model.safetensors", "hf_model/model.safetensors")  # scratch engine, hf engine
    a, b = (load_file(next(tmp / name / w for w in weights if (tmp / name / w).is_file()))
            for name in ("again", "killed"))
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a) if a.keys() == b.keys() else float("nan")
    print(f"restart: uninterrupted {seconds_ok:.1f} s, rank 1 killed after step {kill_step}: "
          f"{seconds_killed:.1f} s -> {seconds_killed - seconds_ok:.1f} s lost; final weights max abs diff {diff:.3g}")


if __name__ == "__main__":
    main()
