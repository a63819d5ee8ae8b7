"""Elastic restart after a killed worker: does the run finish with the model of the uninterrupted run?

The command of issue 28, on the SMS split (the first TRAIN_ROWS training and VAL_ROWS validation rows):

    torchrun --nproc-per-node 2 --max-restarts 1 --master-port PORT -m llmclf train --model gpt2-small \
      --random-init --seed 123 --trainable last-block --epochs 3 --precision float32 --batch-size 4 ...

runs once uninterrupted (the reference), then RUNS times per condition, where one first-generation
worker (rank 0 or 1) gets SIGKILL from outside at one of these moments:
- step: once optimizer step KILL_STEP (mid-epoch 2) is in metrics.jsonl, i.e. during the next step;
- eval: once the first `"event": "epoch"` line is there (+ EVAL_DELAY s), i.e. during the evaluation;
- save: once rank 0's first training state is being written (its temporary file exists);
on a quiet machine and on a busy one (BURNERS processes that spin on the CPU, started and stopped
here; "quiet" only means that this script adds no load: say what else ran). A run passes when
torchrun exits 0 and the final weights equal the reference's (max abs difference < 1e-6, the
tolerance of tests/test_distributed.py); each line also says whether its metrics.jsonl is the
reference's. Failed runs' output goes to --logs (default: a new temporary folder).

    python bench/bench_elastic_restart.py [--runs 20] [--ranks 0,1] [--moments step,eval,save]
        [--loads quiet,busy] [--burners 2] [--model gpt2-small] [--logs DIR]

Set PYTHONPATH to the sources to measure (e.g. another checkout's src/ for "before").
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(os.environ.get("LLMCLF_SHARED", Path(__file__).resolve().parents[2] / "shared"))
TOLERANCE = 1e-6
BURN = "while True: pass"


def children(pid: int) -> list[int]:
    """Every descendant of `pid` (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def worker(launcher: int, rank: int) -> int | None:
    """The pid of the first-generation worker of `rank` under the launcher `launcher`, if it runs."""
    for pid in children(launcher):
        try:
            items = Path(f"/proc/{pid}/environ").read_text().split("\0")
            env = dict(item.split("=", 1) for item in items if "=" in item)
        except OSError:
            continue
        if env.get("RANK") == str(rank) and env.get("TORCHELASTIC_RESTART_COUNT") == "0" and "LOCAL_RANK" in env:
            return pid
    return None


def moment_reached(moment: str, out: Path, kill_step: int) -> bool:
    log = out / "metrics.jsonl"
    if moment == "save":
        return any((out / "checkpoints").glob(".state-*.tmp"))
    try:
        text = log.read_text(encoding="utf-8")
    except OSError:
        return False
    if moment == "eval":
        return '"event": "epoch"' in text
    return f'"step": {kill_step}, ' in text


def train_command(args: argparse.Namespace, data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "1",
            "--master-port", str(free_port()), "-m", "llmclf", "train", "--model", args.model, "--random-init",
            "--seed", "123", "--trainable", "last-block", "--epochs", "3", "--precision", "float32",
            "--batch-size", "4", "--train", str(data / "train.csv"), "--val", str(data / "val.csv"),
            "--text-col", "text", "--label-col", "label", "--out", str(out), "--no-progress"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_run(args: argparse.Namespace, data: Path, out: Path, kill: tuple[int, str] | None,
            log_file: Path) -> tuple[int, str]:
    """(torchrun's exit code, what happened) of one run, killing rank `kill[0]` at moment `kill[1]`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log_file, "w") as log:
        process = subprocess.Popen(train_command(args, data, out), env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        note = "no kill"
        deadline = time.monotonic() + args.timeout
        try:
            if kill is not None:
                rank, moment = kill
                note = "the moment never came"
                while process.poll() is None and time.monotonic() < deadline:
                    if moment_reached(moment, out, args.kill_step):
                        if moment == "eval" and args.eval_delay:
                            time.sleep(args.eval_delay)
                        pid = worker(process.pid, rank)
                        if pid is None:
                            note = f"rank {rank} not found"
                            break
                        os.kill(pid, signal.SIGKILL)
                        note = f"killed rank {rank} (pid {pid}) at {moment}"
                        break
                    time.sleep(0.005)
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            note += "; timed out"
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        log.write(f"\n[bench] {note}; exit code {process.returncode}\n")
    return process.returncode, note


def max_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    if wa.keys() != wb.keys():
        return float("inf")
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20, help="runs per condition")
    parser.add_argument("--ranks", default="0,1")
    parser.add_argument("--moments", default="step,eval,save")
    parser.add_argument("--loads", default="quiet,busy")
    parser.add_argument("--burners", type=int, default=2, help="CPU-spinning processes of the busy load")
    parser.add_argument("--model", default="gpt2-small")
    parser.add_argument("--train-rows", type=int, default=160)
    parser.add_argument("--val-rows", type=int, default=40)
    parser.add_argument("--kill-step", type=int, default=25, help="the step moment: after this optimizer step")
    parser.add_argument("--eval-delay", type=float, default=0.0, help="seconds after the epoch line (eval moment)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one run may take")
    parser.add_argument("--logs", type=Path, default=None, help="keep the output of failed runs here")
    args = parser.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    moments, loads = args.moments.split(","), args.loads.split(",")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"machine: {cpu}, {os.cpu_count()} cores; llmclf from {__import__('llmclf').__file__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        logs = args.logs or Path(tempfile.mkdtemp(prefix="elastic-restart-logs-"))
        logs.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "llmclf", "data", "sms-spam", "--out", str(tmp / "sms"), "--source",
                        str(SHARED / "data/sms_spam/sms_spam_collection.zip")], check=True, capture_output=True)
        data = tmp / "data"
        data.mkdir()
        for split, rows, name in (("train", args.train_rows, "train"), ("validation", args.val_rows, "val")):
            lines = (tmp / "sms" / f"{split}.csv").read_text(encoding="utf-8").splitlines(keepends=True)
            (data / f"{name}.csv").write_text("".join(lines[: rows + 1]), encoding="utf-8")
        reference = tmp / "reference"
        start = time.perf_counter()
        code, _ = one_run(args, data, reference, None, logs / "reference.log")
        if code != 0:
            raise SystemExit(f"the uninterrupted run failed (exit code {code}); see {logs / 'reference.log'}")
        print(f"uninterrupted run: {time.perf_counter() - start:.1f} s", flush=True)
        results = {}
        for load in loads:
            burners = [subprocess.Popen([sys.executable, "-c", BURN]) for _ in range(args.burners if load == "busy"
                                                                                         else 0)]
            try:
                for rank, moment in itertools.product(ranks, moments):
                    passed, seconds = 0, []
                    for i in range(args.runs):
                        out = tmp / f"run-{load}-{rank}-{moment}-{i}"
                        log_file = logs / f"{load}-rank{rank}-{moment}-{i}.log"
                        start = time.perf_counter()
                        code, note = one_run(args, data, out, (rank, moment), log_file)
                        seconds.append(time.perf_counter() - start)
                        diff = max_diff(reference, out) if code == 0 else float("nan")
                        ok = code == 0 and diff < TOLERANCE and note.startswith("killed")
                        if code == 0:
                            same = (out / "metrics.jsonl").read_bytes() == (reference / "metrics.jsonl").read_bytes()
                            note += f"; metrics.jsonl {'identical' if same else 'DIFFERS'}"
                        passed += ok
                        if ok:
                            log_file.unlink()
                        print(f"  {load:5s} rank {rank} {moment:4s} #{i + 1}: {'pass' if ok else 'FAIL'} "
                              f"(exit {code}, max abs diff {diff:.3g}, {note}, {seconds[-1]:.0f} s)", flush=True)
                        subprocess.run(["rm", "-rf", str(out)], check=False)
                    results[(load, rank, moment)] = passed
                    print(f"{load:5s} rank {rank} killed at {moment:4s}: {passed}/{args.runs} passed "
                          f"(median {sorted(seconds)[len(seconds) // 2]:.0f} s a run)", flush=True)
            finally:
                for burner in burners:
                    burner.kill()
                    burner.wait()
        print("summary (passed / runs):")
        for (load, rank, moment), passed in results.items():
            print(f"  {load:5s} rank {rank} {moment:4s} {passed}/{args.runs}")
        print(f"total {sum(results.values())}/{args.runs * len(results)}; logs of failed runs in {logs}")


if __name__ == "__main__":
    main()
