"""Training under torchrun / the elastic agent: 2 CPU processes (gloo) against 1, on a tiny GPT-2.

Each test starts real worker processes (`python -m torch.distributed.run` or `llmclf train
--devices 2`), so each takes some seconds; OMP_NUM_THREADS=1 keeps two workers on two cores. The
longer variants (from tokens, two nodes, MC-dropout prediction, the hf engine) are `slow`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmclf.config import GPTConfig
from llmclf.data.classification import LabelledTexts, write_labelled
from llmclf.distributed import free_port
from llmclf.loaders.checkpoint import save_checkpoint
from llmclf.models.gpt2 import GPTModel

WORDS = {"pos": "great wonderful happy fine", "neg": "awful terrible sad bad"}
TIMEOUT = 300


def _texts(n: int, seed: int) -> LabelledTexts:
    import random

    rng = random.Random(seed)
    labels = [rng.choice(["pos", "neg", "neg"]) for _ in range(n)]  # imbalanced: class weights matter
    texts = [" ".join(rng.sample(WORDS[label].split(), 2) + ["item"] * rng.randint(0, 6)) for label in labels]
    return LabelledTexts(texts, labels, f"toy-{seed}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp")
    torch.manual_seed(0)
    # No q/k/v biases: the key bias cannot change attention (softmax ignores a per-query constant), so its
    # gradient is rounding noise, which AdamW scales up to full-size steps that differ between any two runs.
    lm = save_checkpoint(root / "lm", GPTModel(GPTConfig(context_length=32, emb_dim=32, n_heads=4, n_layers=2,
                                                          drop_rate=0.0, qkv_bias=False)), tokenizer)
    # 43 training texts: the last global batch of 8 has 3 (ranks get 1 and 2); 13 validation texts
    write_labelled(_texts(43, 1), root / "train.csv")
    write_labelled(_texts(13, 2), root / "val.csv")
    return {"root": root, "lm": lm, "train": root / "train.csv", "val": root / "val.csv"}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LLMCLF_FAULT")}
    return {**env, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **extra}


def _call(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python ARGS` in its own process group: a timeout kills the launcher and every worker it started."""
    with subprocess.Popen([sys.executable, *args], env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = _call(args, env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def _train_args(setup: dict[str, Path], out: Path, batch_size: int, *extra: str) -> list[str]:
    return ["train", "--model", str(setup["lm"]), "--train", str(setup["train"]), "--val", str(setup["val"]),
            "--out", str(out), "--batch-size", str(batch_size), "--epochs", "2", "--trainable", "last-block",
            "--pooling", "last", "--template", "{text}", "--lr", "3e-3", "--class-weights", "balanced",
            "--precision", "float32", "--no-progress", "--log-every", "2", *extra]


def _torchrun(nproc: int, *args: str) -> list[str]:
    return ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m", "llmclf", *args]


def _max_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


@pytest.mark.parametrize("cache", ["--cache", pytest.param("--no-cache", marks=pytest.mark.slow)],
                         ids=["from-cached-states", "from-tokens"])
def test_two_processes_of_batch_4_train_what_one_of_batch_8_trains(setup, cache):
    root = setup["root"]
    one, two = root / f"one{cache}", root / f"two{cache}"
    _run(["-m", "llmclf", *_train_args(setup, one, 8, cache)])
    result = _run(_torchrun(2, *_train_args(setup, two, 4, cache)))
    assert "2 processes x batch 4 x grad-accum 1 = 8 texts per optimizer step" in result.stderr
    assert _max_diff(one, two) < 1e-5
    saved = [json.loads((d / "config.json").read_text())["metrics"]["validation"] for d in (one, two)]
    assert saved[0]["n"] == saved[1]["n"] == 13  # every validation text once, none twice
    assert saved[0]["confusion_matrix"] == saved[1]["confusion_matrix"]
    assert saved[0]["loss"] == pytest.approx(saved[1]["loss"], abs=1e-5)
    # rank 0 alone writes: one metrics log, with as many step lines as one process writes
    steps = [sum(json.loads(line)["event"] == "step" for line in (d / "metrics.jsonl").read_text().splitlines())
             for d in (one, two)]
    assert steps[0] == steps[1] == 2 * 6
    assert result.stdout.count("trained in") == 1


RESTART_ARGS = ["--grad-accum", "2", "--save-every", "2"]


@pytest.fixture(scope="module")
def uninterrupted(setup) -> Path:
    """The run that the restart tests' killed runs must end like: 2 processes, a state every 2 steps."""
    reference = setup["root"] / "reference"
    _run(_torchrun(2, *_train_args(setup, reference, 4, *RESTART_ARGS)))
    return reference


def test_devices_restarts_a_killed_worker_and_finishes_like_an_uninterrupted_run(setup, uninterrupted):
    root = setup["root"]
    reference, killed, args = uninterrupted, root / "killed", RESTART_ARGS
    # rank 1 SIGKILLs itself right after optimizer step 5 (mid-epoch 2); the agent restarts both workers
    # (a bounded process-group timeout and a spare restart: a reconnect that fails costs a restart, not a hang)
    result = _run(["-m", "llmclf", *_train_args(setup, killed, 4, *args), "--devices", "2", "--max-restarts", "2"],
                  env=_env(LLMCLF_FAULT="step:5@1", LLMCLF_DIST_TIMEOUT="60"))
    # the agent reports the first failed worker it sees: the killed one (-9) or its peer, whose collective the
    # kill broke (a race, as in the torchrun test below); then the group restarts and resumes
    assert re.search(r"\(exitcode: -?\d+\)", result.stderr) and "resuming" in result.stderr, result.stderr[-3000:]
    assert _max_diff(reference, killed) < 1e-6
    assert not (killed / "checkpoints").exists()


@pytest.mark.parametrize("fault", ["save:4@0", pytest.param("step:5@1", marks=pytest.mark.slow)],
                         ids=["rank-0-mid-save", "rank-1-mid-epoch"])
def test_torchrun_restarts_a_killed_worker_on_a_busy_cpu_and_finishes_like_an_uninterrupted_run(setup, uninterrupted,
                                                                                                 fault):
    """torchrun --master-port: every generation of workers meets in the agent's one store, where the
    restarted group used to read its dead peer's address and failed or hung (issue 28); a process
    spinning on the CPU slows the workers down as another job on the same cores does."""
    reference, killed = uninterrupted, setup["root"] / f"killed-{fault}"
    torchrun = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "1", "--master-port",
                str(free_port()), "-m", "llmclf", *_train_args(setup, killed, 4, *RESTART_ARGS)]
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        result = _run(torchrun, env=_env(LLMCLF_FAULT=fault))
    finally:
        burner.kill()
        burner.wait()
    # the agent saw a worker fail (the killed one, -9, or its peer, whose collective broke first: which
    # one it reports is a race) and the restarted group resumed
    assert re.search(r"\(exitcode: -?\d+\)", result.stderr) and "resuming" in result.stderr, result.stderr[-3000:]
    assert _max_diff(reference, killed) < 1e-6
    assert not (killed / "checkpoints").exists()
    # the metrics log of the resumed run is the uninterrupted run's: what the killed group logged after
    # its last state is gone
    assert (killed / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()


def test_each_generation_of_workers_joins_under_keys_of_its_own(monkeypatch):
    """In the agent's store, which outlives its workers, a restarted group cannot read the keys (gloo's
    addresses) of the group before it."""
    from torch.distributed import TCPStore

    from llmclf import distributed

    agent_store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(agent_store.port), "RANK": "0",
                        "WORLD_SIZE": "2", "TORCHELASTIC_USE_AGENT_STORE": "True"}.items():
        monkeypatch.setenv(name, value)
    for count in ("0", "1"):
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", count)
        store, rank, world = distributed.generation_store()
        assert (rank, world) == (0, 2) and not store.check(["rank_0"])
        store.set("rank_0", f"address of generation {count}")
    assert agent_store.get("llmclf/generation-0/rank_0") == b"address of generation 0"
    assert agent_store.get("llmclf/generation-1/rank_0") == b"address of generation 1"


def test_a_worker_records_its_error_for_the_agent_and_a_finished_one_still_exits(monkeypatch, tmp_path):
    from llmclf import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    with pytest.raises(SystemExit) as finished:  # how a command ends; llmclf's main then calls end_worker
        distributed.recorded(lambda: sys.exit(0))()
    assert finished.value.code == 0 and not (tmp_path / "error.json").exists()

    def fail() -> None:
        raise RuntimeError("Gloo connectFullMesh failed")

    with pytest.raises(RuntimeError):
        distributed.recorded(fail)()
    error = json.loads((tmp_path / "error.json").read_text())["message"]
    assert error["message"] == "RuntimeError: Gloo connectFullMesh failed" and "in fail" in error["extraInfo"][
        "py_callstack"]


def test_a_failed_worker_says_why_in_the_agent_summary(setup, tmp_path):
    args = _train_args(setup, tmp_path / "out", 4)
    args[args.index(str(setup["val"]))] = str(tmp_path / "missing.csv")
    result = _call(_torchrun(2, *args))
    assert result.returncode != 0
    summary = result.stderr[result.stderr.index("Root Cause"):]
    assert "missing.csv" in summary and "error_file: <N/A>" not in summary, summary


@pytest.mark.slow
def test_two_nodes_on_loopback_train_what_one_node_of_two_processes_trains(setup):
    root = setup["root"]
    single, multi = root / "single-node", root / "two-nodes"
    _run(_torchrun(2, *_train_args(setup, single, 4)))
    port = free_port()
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
         "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
         "--rdzv-id", "llmclf-test", "-m", "llmclf", *_train_args(setup, multi, 4)],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        for rank in (0, 1)]
    try:
        outputs = [node.communicate(timeout=TIMEOUT) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    for node, (_, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, err[-4000:]
    assert _max_diff(single, multi) < 1e-6


def test_ranks_with_different_data_refuse_to_train(setup, tmp_path):
    """Rank 1 reads other training data (an environment-dependent path): every rank says so."""
    other = tmp_path / "other.csv"
    write_labelled(_texts(43, 9), other)
    script = ("import os, sys; from llmclf.cli import main; "
              "sys.argv = ['llmclf'] + [a.replace('TRAIN', os.environ['TRAIN_' + os.environ['RANK']]) "
              "for a in sys.argv[1:]]; main()")
    args = _train_args(setup, tmp_path / "out", 4)
    args[args.index(str(setup["train"]))] = "TRAIN"
    env = _env(TRAIN_0=str(setup["train"]), TRAIN_1=str(other))
    result = _call(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--no-python",
                    sys.executable, "-c", script, *args], env=env)
    assert result.returncode != 0
    assert "were started with other training options or data than rank 0" in result.stderr


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, shared_dir) -> Path:
    from tiny_classifier import tiny_classifier_dir

    return tiny_classifier_dir(tmp_path_factory, shared_dir)


@pytest.mark.parametrize("output, extra", [
    ("out.csv", []), pytest.param("out.jsonl", ["--mc-dropout", "2", "--seed", "1"], marks=pytest.mark.slow)],
    ids=["csv", "jsonl-mc-dropout"])
def test_sharded_prediction_writes_the_one_process_file_and_resumes_after_a_kill(classifier, tmp_path, output,
                                                                                 extra):
    texts = tmp_path / "texts.txt"
    words = ["great", "wonderful", "awful", "sad", "happy", "terrible", "today"]
    texts.write_text("".join(f"{words[i % 7]} {words[(3 * i) % 7]} {i}\n" for i in range(103)), encoding="utf-8")
    args = ["predict", "--model", str(classifier), "--input", str(texts), "--chunk-size", "10", "--no-progress",
            "--precision", "float32", *extra]
    one, two = tmp_path / f"one-{output}", tmp_path / f"two-{output}"
    _run(["-m", "llmclf", *args, "--output", str(one)])
    _run(["-m", "llmclf", *args, "--output", str(two), "--devices", "2"])
    assert two.read_bytes() == one.read_bytes()
    # rank 1 dies once 40 rows are saved (after the second round of 2 x 10): rank 0 keeps them, a rerun resumes
    killed = tmp_path / f"killed-{output}"
    failed = _call(_torchrun(2, *args, "--output", str(killed)), env=_env(LLMCLF_FAULT="rows:40@1"))
    assert failed.returncode != 0 and not killed.exists()
    state = json.loads(killed.with_name(killed.name + ".partial.json").read_text())
    assert state["rows"] == 40
    result = _run(_torchrun(2, *args, "--output", str(killed)))
    assert "(resumed after 40 rows)" in result.stdout
    assert killed.read_bytes() == one.read_bytes()


@pytest.mark.slow
def test_hf_engine_under_torchrun_writes_one_directory_like_one_process(tmp_path):
    from test_hf_engine import _reviews, _tiny_bert_dir

    bert = _tiny_bert_dir(tmp_path / "bert")
    write_labelled(_reviews(40, 1), tmp_path / "train.csv")
    write_labelled(_reviews(13, 2), tmp_path / "val.csv")
    args = ["train", "--model", str(bert), "--train", str(tmp_path / "train.csv"), "--val", str(tmp_path / "val.csv"),
            "--epochs", "2", "--batch-size", "4", "--lr", "5e-3", "--precision", "float32", "--no-progress"]
    _run(["-m", "llmclf", *args, "--out", str(tmp_path / "one")])
    result = _run(_torchrun(2, *args, "--out", str(tmp_path / "two")))
    listing = [sorted(p.relative_to(tmp_path / d).as_posix() for p in (tmp_path / d).rglob("*"))
               for d in ("one", "two")]
    assert listing[0] == listing[1] and "hf_model/model.safetensors" in listing[1]
    assert "checkpoints" not in listing[1]
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["metrics"]["validation"]["n"] == 13 and config["engine"] == "hf"
    assert result.stdout.count("trained in") == 1
    history = json.loads((tmp_path / "two" / "history.json").read_text())
    assert history["global_step"] == 2 * 5  # 40 texts / (2 processes x 4) per step, 2 epochs


def test_a_node_that_never_joins_ends_the_run_with_an_error_not_a_hang(setup, tmp_path):
    start = time.perf_counter()
    result = _call(
        ["-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", "0", "--nproc-per-node", "1",
         "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-conf", "join_timeout=5",
         "-m", "llmclf", *_train_args(setup, tmp_path / "out", 4)])
    assert result.returncode != 0 and "RendezvousTimeoutError" in result.stderr
    assert time.perf_counter() - start < 60
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_cuda_requested_without_a_gpu_is_a_clear_error(setup):
    from llmclf.engines.scratch import TextClassifier
    from llmclf.errors import ConfigError

    with pytest.raises(ConfigError, match="--device cuda was requested but this machine has no CUDA GPU"):
        TextClassifier(str(setup["lm"]), device="cuda").fit(_texts(8, 1), _texts(4, 2), progress=False)


def test_a_finished_worker_ends_with_its_exit_code_after_the_exit_handlers_and_flushed_output():
    script = ("import atexit, sys\n"
              "from llmclf import distributed\n"
              "atexit.register(lambda: print('exit handler ran', flush=True))\n"
              "print('buffered output', end='')\n"
              "sys.stderr.write('buffered error')\n"
              "distributed.end_worker(3)\n"
              "print('not reached')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 3
    assert result.stdout == "buffered outputexit handler ran\n" and result.stderr == "buffered error"
