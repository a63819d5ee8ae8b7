"""Injected faults: a disk that fills up, or a directory the user may not write in, in the middle of
every writer (model save, training state, predict output, data split), and SIGINT/SIGTERM during
`train` and `predict`. Whatever happens: the previous complete file or directory is intact, nothing
temporary is left behind, the error says what happened and where, and an interrupted run resumes to
what an uninterrupted one gives.

The faults are real ones from the kernel, for every writer alike (Python, torch, Rust): a full disk
is a small tmpfs mounted for the test (root only: skipped elsewhere); a directory the user may not
write in has mode 555, and for root, whose CAP_DAC_OVERRIDE ignores modes, that capability is
dropped from the test's thread while it writes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shlex
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from llmclf.classifier import TextClassifier, load_classifier
from llmclf.cli import main
from llmclf.data.classification import read_labelled, write_labelled
from llmclf.loaders.tensors import WriteError
from llmclf.ngrams import N_FEATURES, NgramModel
from llmclf.predict import partial_paths, predict_file
from llmclf.training.state import StopRequest, TrainingInterruptedError, load_training_state, stop_requests
from tiny_classifier import NEGATIVE, POSITIVE, WORDS, tiny_classifier_dir, tiny_dropout_lm, toy_data

PAGE = 4096  # tmpfs allocates whole pages


# --- the faults ---------------------------------------------------------------------------------

class SmallDisk:
    """A tmpfs of its own; `leave(n)` fills it (one file, `.filler`) so that n bytes (whole pages) stay free."""

    def __init__(self, root: Path) -> None:
        self.root, self.filler = root, root / ".filler"

    def free(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def leave(self, nbytes: int) -> None:
        self.release()
        nbytes -= nbytes % PAGE
        with open(self.filler, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, self.free() - nbytes)
        assert self.free() == nbytes

    def release(self) -> None:
        self.filler.unlink(missing_ok=True)


@pytest.fixture
def disk(tmp_path):
    root = tmp_path / "disk"
    root.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a disk that fills up is a small tmpfs, and mounting one needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(root)], capture_output=True,
                             text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield SmallDisk(root)
    finally:
        subprocess.run(["umount", "-l", str(root)], check=True)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


@contextlib.contextmanager
def read_only(directory: Path):
    """`directory` with mode 555 while the block runs; for root, CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH
    (which ignore modes) are dropped from this thread's effective set meanwhile."""
    mode = stat.S_IMODE(directory.stat().st_mode)
    directory.chmod(0o555)
    libc, header, caps = ctypes.CDLL(None, use_errno=True), _CapHeader(0x20080522, 0), (_CapData * 2)()
    root = os.geteuid() == 0
    try:
        if root:
            if libc.capget(ctypes.byref(header), caps) != 0:
                pytest.skip("capget failed: cannot run as root without CAP_DAC_OVERRIDE")
            effective = caps[0].effective
            caps[0].effective &= ~((1 << 1) | (1 << 2))  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
            if libc.capset(ctypes.byref(header), caps) != 0:
                pytest.skip("capset failed: cannot run as root without CAP_DAC_OVERRIDE")
        try:
            yield
        finally:
            if root:
                caps[0].effective = effective
                assert libc.capset(ctypes.byref(header), caps) == 0
    finally:
        directory.chmod(mode)


def files(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` (relative path -> bytes), temporary and hidden ones included."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def same_files(a: Path, b: Path) -> bool:
    """The same files with the same contents (safetensors: the same tensors and metadata, in any order)."""
    from safetensors import safe_open

    def content(path: Path, data: bytes):
        if path.suffix != ".safetensors":
            return data
        with safe_open(path, "np") as f:
            return f.metadata(), {k: f.get_tensor(k).tobytes() for k in f.keys()}  # noqa: SIM118

    fa, fb = files(a), files(b)
    return fa.keys() == fb.keys() and all(content(a / n, fa[n]) == content(b / n, fb[n]) for n in fa)


class UnhandledSignalError(Exception):
    pass


def _unhandled(signum, frame):
    raise UnhandledSignalError(f"{signal.Signals(signum).name} reached the test's own handler")


@contextlib.contextmanager
def guarded_signals():
    """SIGINT/SIGTERM that the code under test fails to handle raise UnhandledSignalError here (a test
    failure) instead of ending pytest."""
    before = {s: signal.signal(s, _unhandled) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """(exit code, stderr) of `llmclf ARGS` through the console entry point (errors, signals and all)."""
    monkeypatch.setattr(sys, "argv", ["llmclf", *args])
    with guarded_signals():
        with pytest.raises(SystemExit) as done:
            main()
        assert signal.getsignal(signal.SIGTERM) is _unhandled  # main() restores the handlers it replaced
    return done.value.code, capsys.readouterr().err


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# --- model directories ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clf_dir(tmp_path_factory, shared_dir):
    return tiny_classifier_dir(tmp_path_factory, shared_dir)


def _with_ngrams(clf, seed: int):
    """`clf` with random n-gram weights (ngrams.safetensors) and its head's bias moved by `seed`."""
    rng = np.random.default_rng(seed)
    coef = rng.normal(size=(2, 2 * N_FEATURES)).astype(np.float32)
    clf.ngrams_ = NgramModel(np.ones(2 * N_FEATURES, np.float32), coef, np.zeros(2, np.float32), np.ones(2, np.float32))
    clf.ensemble = "tfidf"
    with torch.no_grad():
        clf.model_.backbone.out_head.bias += seed
    return clf


# The files of a scratch model directory, in the order `TextClassifier.save` writes them.
WRITE_ORDER = ["ngrams.safetensors", "model.safetensors", "encoder.json", "vocab.bpe", "config.json"]


def test_a_model_save_that_fills_the_disk_anywhere_leaves_the_previous_model(clf_dir, disk, tmp_path):
    old = _with_ngrams(load_classifier(clf_dir, precision="float32"), 0)
    new = _with_ngrams(load_classifier(clf_dir, precision="float32"), 1)
    pages = {name: -(-len(data) // PAGE) for name, data in files(new.save(tmp_path / "new")).items()}
    assert sorted(pages) == sorted(WRITE_ORDER)
    target = disk.root / "model"
    before = files(old.save(target))
    texts = [POSITIVE, NEGATIVE, "so so"]
    expected = load_classifier(target).predict_proba(texts)

    failed_in = []
    for i, name in enumerate(WRITE_ORDER):  # run out of space halfway through each file in turn
        disk.leave(PAGE * (sum(pages[n] for n in WRITE_ORDER[:i]) + pages[name] // 2))
        with pytest.raises(WriteError) as error:
            new.save(target)
        assert error.value.errno == errno.ENOSPC and "the disk is full" in str(error.value)
        failed_in.append(Path(error.value.filename).relative_to(target).as_posix())
        assert files(target) == before  # the previous model, byte for byte; no temporary file
    assert failed_in == WRITE_ORDER  # ... in the middle of every writer
    np.testing.assert_array_equal(load_classifier(target).predict_proba(texts), expected)

    disk.leave(PAGE * sum(pages.values()))  # exactly enough: the new model, whole
    new.save(target)
    assert same_files(target, tmp_path / "new")


def test_a_first_save_that_fails_leaves_no_directory(clf_dir, disk):
    disk.leave(16 * PAGE)
    with pytest.raises(WriteError, match="cannot write .*model.safetensors: the disk is full"):
        load_classifier(clf_dir).save(disk.root / "model")
    assert sorted(p.name for p in disk.root.iterdir()) == [".filler"]


def test_a_save_into_a_directory_the_user_may_not_write_in(clf_dir, tmp_path):
    target = tmp_path / "model"
    clf = load_classifier(clf_dir)
    before = files(clf.save(target))
    with read_only(target), pytest.raises(WriteError) as error:
        clf.save(target)
    assert error.value.errno == errno.EACCES
    assert str(error.value).startswith(f"cannot write {target}: permission denied")
    assert files(target) == before


def test_hf_model_save_that_fills_the_disk_leaves_the_previous_model(disk, tmp_path):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from llmclf.engines.hf import HFClassifier

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie"]
    torch.manual_seed(0)
    clf = HFClassifier("tiny-bert")
    clf.model_ = BertForSequenceClassification(BertConfig(
        vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=2))
    clf.tokenizer_ = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    clf.classes_, clf.max_length_, clf.template_ = ["bad", "good"], 32, None
    target = disk.root / "model"
    before = files(clf.save(target))
    with torch.no_grad():
        clf.model_.classifier.bias += 1.0
    total = sum(-(-len(data) // PAGE) for data in files(clf.save(tmp_path / "new")).values())
    failed_in = []
    for budget in (0, total // 2, total - 1):  # pages: at hf_model/config.json, in the weights, at config.json
        disk.leave(budget * PAGE)
        with pytest.raises(WriteError, match=f"cannot write {target}.*: the disk is full") as error:
            clf.save(target)
        failed_in.append(Path(error.value.filename).relative_to(target).as_posix())
        assert files(target) == before
    assert failed_in == [".", ".", "config.json"]  # (transformers' writers do not say which file they were at)
    disk.leave(total * PAGE)
    clf.save(target)
    assert same_files(target, tmp_path / "new")
    np.testing.assert_allclose(HFClassifier.load(target).predict_proba(["good movie"]),
                               clf.predict_proba(["good movie"]), atol=1e-6)


# --- training: states, the final save, signals ---------------------------------------------------

# 24 texts / batch 4 = 6 batches an epoch, 2 per step: 3 optimizer steps an epoch, 9 in all; training
# states after steps 2, 3, 4, 6, 8 and 9 (every epoch and every 2 steps); dropout on.
PARAMS = {"trainable": "last-block", "epochs": 3, "batch_size": 4, "grad_accum": 2, "lr": 3e-3,
          "lr_schedule": "cosine", "warmup": 0.2, "log_every": 100, "eval_iter": 1, "precision": "float32",
          "save_every": 2, "ensemble": "none"}
@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer):
    """A tiny GPT-2 with dropout, train/validation CSV files, and the model of an uninterrupted run."""
    tmp = tmp_path_factory.mktemp("run")
    lm = tiny_dropout_lm(tmp / "lm", tokenizer)
    write_labelled(toy_data(24, pos_every=3), tmp / "train.csv")
    write_labelled(toy_data(8, offset=100), tmp / "val.csv")
    fit(lm, tmp, tmp / "whole")
    return lm, tmp, load_file(tmp / "whole" / "model.safetensors")


def fit(lm: Path, data: Path, out: Path, resume: bool = False) -> TextClassifier:
    return TextClassifier(str(lm), **PARAMS).fit(read_labelled(data / "train.csv"), read_labelled(data / "val.csv"),
                                                 out_dir=out, progress=False, resume=resume)


def assert_same_weights(out: Path, expected: dict[str, torch.Tensor]) -> None:
    got = load_file(out / "model.safetensors")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert not (out / "checkpoints").exists()


def _fill_disk_after_state(monkeypatch, disk: SmallDisk, when, free) -> list[Path]:
    """Once a training state for which `when(state)` holds is written, fill the disk up to `free(path)`
    bytes (as another program writing there would). Returns the paths of the states written."""
    import llmclf.training.classifier as loop

    real, saved = loop.save_training_state, []

    def save_then_fill(state_dir, step, state):
        path = real(state_dir, step, state)
        saved.append(path)
        if when(state) and not disk.filler.exists():
            disk.leave(free(path))
        return path

    monkeypatch.setattr(loop, "save_training_state", save_then_fill)
    return saved


def test_a_training_state_that_fills_the_disk_keeps_the_previous_one_and_resumes(run, disk, monkeypatch):
    lm, data, whole = run
    out = disk.root / "run"
    # after the first state (step 2), half its size is left: the next one (step 3) fills the disk midway
    saved = _fill_disk_after_state(monkeypatch, disk, lambda state: True, lambda path: path.stat().st_size // 2)
    with pytest.raises(WriteError) as error:
        fit(lm, data, out)
    message = str(error.value)
    assert error.value.errno == errno.ENOSPC and f"cannot write {out / 'checkpoints' / 'state-00000003.pt'}: the " \
        "disk is full" in message and "saved before are intact" in message and "--resume" in message
    assert [p.name for p in saved] == ["state-00000002.pt"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["run.json", "state-00000002.pt"]
    assert load_training_state(out / "checkpoints")["history"]["global_step"] == 2
    monkeypatch.undo()
    disk.release()
    fit(lm, data, out, resume=True)
    assert_same_weights(out, whole)


def test_a_finished_run_whose_model_cannot_be_saved_is_not_lost(run, disk, monkeypatch):
    lm, data, whole = run
    out = disk.root / "run"
    # the final state written, 16 pages are left: too few for the model (~7 MB)
    _fill_disk_after_state(monkeypatch, disk, lambda state: state["finished"], lambda path: 16 * PAGE)
    with pytest.raises(WriteError) as error:
        fit(lm, data, out)
    assert f"cannot write {out / 'model.safetensors'}: the disk is full" in str(error.value)
    assert "training state is kept" in str(error.value) and "--resume" in str(error.value)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "metrics.jsonl"]  # no half-saved model
    monkeypatch.undo()
    disk.release()
    fit(lm, data, out, resume=True)
    assert_same_weights(out, whole)


def _train_args(lm: Path, data: Path, out: Path) -> list[str]:
    args = ["train", "--model", str(lm), "--train", str(data / "train.csv"), "--val", str(data / "val.csv"),
            "--out", str(out), "--no-progress"]
    for name, value in PARAMS.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    return args


def test_sigterm_during_train_saves_the_state_and_prints_how_to_resume(run, tmp_path, monkeypatch, capsys):
    """A real `llmclf train` process, sent SIGTERM right after optimizer step 5 (mid-epoch 2, one step
    after the state of step 4): it saves the state of step 5, exits 143 and prints the command that
    resumes; that command finishes the run with the weights of the uninterrupted run."""
    lm, data, whole = run
    out = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-m", "llmclf", *_train_args(lm, data, out)], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "LLMCLF_FAULT": "step:5:SIGTERM",
                                                         "OMP_NUM_THREADS": str(torch.get_num_threads())})
    assert killed.returncode == 143, killed.stderr
    assert "Traceback" not in killed.stderr
    assert "interrupted: training stopped by SIGTERM after optimizer step 5 of 9 (epoch 2, batch 4 of 6); " \
        f"its state is saved in {out / 'checkpoints'}" in killed.stderr
    assert sorted(p.name for p in (out / "checkpoints").glob("state-*")) == ["state-00000004.pt",
                                                                            "state-00000005.pt"]
    command = shlex.split(killed.stderr.split("Resume with:\n")[1].splitlines()[0])
    assert command == ["llmclf", *_train_args(lm, data, out), "--resume"]
    code, stderr = cli(monkeypatch, capsys, *command[1:])
    assert code == 0, stderr
    assert_same_weights(out, whole)


def test_sigint_while_a_state_is_written_stops_after_it_and_resumes_exactly(run, tmp_path, monkeypatch):
    """SIGINT while the state of step 6 (the end of epoch 2) is written: the write completes, training
    stops there (TrainingInterruptedError, exit code 130) and resumes to the uninterrupted run's model."""
    lm, data, whole = run
    out = tmp_path / "run"
    monkeypatch.setenv("LLMCLF_FAULT", "save:6:SIGINT")
    with guarded_signals():
        with pytest.raises(TrainingInterruptedError) as stopped:
            fit(lm, data, out)
        assert signal.getsignal(signal.SIGINT) is _unhandled  # fit restores the handlers it replaced
    assert stopped.value.exit_code == 130
    assert "by SIGINT after optimizer step 6 of 9 (the end of epoch 2)" in str(stopped.value)
    assert load_training_state(out / "checkpoints")["history"]["global_step"] == 6
    monkeypatch.delenv("LLMCLF_FAULT")
    fit(lm, data, out, resume=True)
    assert_same_weights(out, whole)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_at_an_arbitrary_moment_of_train(run, tmp_path, monkeypatch, capsys, sig):
    """The signal sent from outside as soon as the first training state exists, whatever the process
    is doing then (a step, an evaluation, a state write)."""
    import time

    lm, data, whole = run
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "llmclf", *_train_args(lm, data, out)], stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    deadline = time.monotonic() + 120
    while not list((out / "checkpoints").glob("state-*.pt")) and process.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(sig)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 128 + sig and "Resume with:" in stderr and "Traceback" not in stderr, stderr
    assert cli(monkeypatch, capsys, *_train_args(lm, data, out), "--resume")[0] == 0
    assert_same_weights(out, whole)


@pytest.mark.slow
def test_hf_engine_stops_on_sigint_and_resumes_exactly(tmp_path, monkeypatch):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from llmclf.engines.hf import HFClassifier

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "item", *" ".join(WORDS.values()).split()]
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(tmp_path / "bert")
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(tmp_path / "bert")
    train, val = toy_data(40, pos_every=3), toy_data(12, offset=100)
    params = {"epochs": 2, "batch_size": 4, "lr": 1e-2, "save_every": 3, "log_every": 2, "precision": "float32",
              "device": "cpu"}  # 10 optimizer steps an epoch
    out = tmp_path / "run"
    monkeypatch.setenv("LLMCLF_FAULT", "step:4:SIGINT")
    with pytest.raises(TrainingInterruptedError, match="by SIGINT after optimizer step 4 of 20; its state is saved"):
        HFClassifier(str(tmp_path / "bert"), **params).fit(train, val, out_dir=out, progress=False)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    monkeypatch.delenv("LLMCLF_FAULT")
    resumed = HFClassifier(str(tmp_path / "bert"), **params).fit(train, val, out_dir=out, progress=False,
                                                                 resume=True)
    whole = HFClassifier(str(tmp_path / "bert"), **params).fit(train, val, progress=False)
    assert resumed.history_["evaluations"] == whole.history_["evaluations"]
    np.testing.assert_allclose(resumed.predict_proba(val.texts), whole.predict_proba(val.texts), atol=1e-6)


def test_a_second_signal_acts_at_once_as_without_the_first():
    class StoppedError(Exception):
        pass

    def handler(signum, frame):  # as the CLI's would, and never the default (which would end pytest)
        raise StoppedError(signum)

    before = signal.signal(signal.SIGTERM, handler)
    try:
        with stop_requests() as request:
            assert request == StopRequest()
            os.kill(os.getpid(), signal.SIGTERM)
            assert request.signum == signal.SIGTERM  # recorded: training goes on to its step boundary
            with pytest.raises(StoppedError):
                os.kill(os.getpid(), signal.SIGTERM)  # the second: the handler from before, at once
        assert signal.getsignal(signal.SIGTERM) is handler
        with stop_requests(enabled=False), pytest.raises(StoppedError):
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, before)


# --- predict output -----------------------------------------------------------------------------

TEXTS = [POSITIVE, NEGATIVE, 'a "quoted", comma', "émoji 😀", "", "great", "sad", "so so"] * 50
CHUNK = 200  # rows: ~7 KB of output (two chunks)


def _input(path: Path, texts: list[str] = TEXTS) -> Path:
    import pandas as pd

    pd.DataFrame({"text": texts}).to_csv(path, index=False)
    return path


@pytest.mark.parametrize("where", ["output", pytest.param("checkpoint", marks=pytest.mark.slow)])
def test_predict_output_that_fills_the_disk_resumes_to_the_same_file(clf_dir, disk, tmp_path, where):
    """The disk fills up in the middle of the second chunk's rows (output: they need two pages more, one
    is left) or of the checkpoint written after them (checkpoint: it needs a page, none is left)."""
    clf = load_classifier(clf_dir, precision="float32")
    src = _input(tmp_path / "in.csv")
    reference = Path(predict_file(clf, src, tmp_path / "reference.csv", chunk_size=CHUNK, progress=False)["output"])
    with open(reference, "rb") as f:
        lines = [len(line) for line in f]  # the header, then one line a row here
    pages = [-(-sum(lines[:1 + n * CHUNK]) // PAGE) for n in (1, 2)]  # of the output after one chunk, two
    assert pages[1] - pages[0] == 2
    written = pages[0] if where == "output" else pages[1]
    out = disk.root / "out.csv"
    partial, state = partial_paths(out)
    # output: a page for the checkpoint, one for its next version (which replaces it) and one left
    disk.leave((written + {"output": 2, "checkpoint": 1}[where]) * PAGE)
    with pytest.raises(WriteError) as error:
        predict_file(clf, src, out, chunk_size=CHUNK, progress=False)
    failed = {"output": partial, "checkpoint": state}[where]
    assert error.value.errno == errno.ENOSPC and str(error.value).startswith(f"cannot write {failed}: the disk is full")
    assert json.loads(state.read_text())["rows"] == CHUNK and not out.exists()
    assert sorted(p.name for p in disk.root.iterdir()) == sorted([".filler", partial.name, state.name])
    disk.release()
    assert predict_file(clf, src, out, chunk_size=CHUNK, progress=False)["resumed_from"] == CHUNK
    assert out.read_bytes() == reference.read_bytes()


def test_predict_into_a_directory_the_user_may_not_write_in(clf_dir, tmp_path, monkeypatch, capsys):
    src = _input(tmp_path / "in.csv")
    target = tmp_path / "out"
    target.mkdir()
    with read_only(target):
        code, stderr = cli(monkeypatch, capsys, "predict", "--model", str(clf_dir), "--input", str(src), "--output",
                           str(target / "p.csv"), "--no-progress")
    assert code == 1 and one_error_line(stderr).startswith(f"error: cannot write {target / 'p.csv'}: permission denied")
    assert list(target.iterdir()) == []


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", pytest.param("SIGTERM to a process", marks=pytest.mark.slow)])
def test_predict_interrupted_by_a_signal_resumes_to_the_same_file(clf_dir, tmp_path, monkeypatch, capsys, how):
    """SIGINT or SIGTERM after 16 rows (through the console entry point, here or in a process of its
    own): exit 130/143, the partial output is kept, and the same command completes it to the file an
    uninterrupted run writes, byte for byte."""
    src = _input(tmp_path / "in.csv", TEXTS[:40])
    reference = tmp_path / "reference.jsonl"
    args = ["predict", "--model", str(clf_dir), "--input", str(src), "--chunk-size", "8", "--no-progress"]
    assert cli(monkeypatch, capsys, *args, "--output", str(reference))[0] == 0
    out = tmp_path / "out.jsonl"
    partial, state = partial_paths(out)
    if how == "SIGTERM to a process":
        stopped = subprocess.run([sys.executable, "-m", "llmclf", *args, "--output", str(out)], capture_output=True,
                                 text=True, timeout=300, env={**os.environ, "LLMCLF_FAULT": "rows:16:SIGTERM",
                                                              "OMP_NUM_THREADS": str(torch.get_num_threads())})
        code, stderr = stopped.returncode, stopped.stderr
    else:
        monkeypatch.setenv("LLMCLF_FAULT", f"rows:16:{how}")
        code, stderr = cli(monkeypatch, capsys, *args, "--output", str(out))
        monkeypatch.delenv("LLMCLF_FAULT")
    name = how.split()[0]
    assert code == {"SIGTERM": 143, "SIGINT": 130}[name] and f"interrupted by {name}" in stderr, stderr
    assert "Traceback" not in stderr
    assert json.loads(state.read_text())["rows"] == 16 and not out.exists()
    assert not out.with_name(out.name + ".lock").exists()
    assert cli(monkeypatch, capsys, *args, "--output", str(out))[0] == 0
    assert out.read_bytes() == reference.read_bytes() and not partial.exists()


# --- data split and sms-spam outputs ----------------------------------------------------------------

def test_data_split_that_fills_the_disk_keeps_the_previous_split(disk, tmp_path, monkeypatch, capsys):
    write_labelled(toy_data(600), tmp_path / "all.csv")
    split = ["data", "split", str(tmp_path / "all.csv"), "--out"]
    assert cli(monkeypatch, capsys, *split, str(tmp_path / "new"), "--seed", "5")[0] == 0
    out = disk.root / "split"
    assert cli(monkeypatch, capsys, *split, str(out))[0] == 0
    before = files(out)
    disk.leave(len((tmp_path / "new" / "train.csv").read_bytes()) + PAGE - 1)  # room for the new train.csv only
    code, stderr = cli(monkeypatch, capsys, *split, str(out), "--seed", "5")
    assert code == 1 and one_error_line(stderr) == f"error: cannot write {out / 'validation.csv'}: the disk is full " \
        "(No space left on device)"
    assert files(out) == before  # not a new train.csv beside the old test.csv (whose rows it may hold)
    disk.release()
    assert cli(monkeypatch, capsys, *split, str(out), "--seed", "5")[0] == 0
    assert files(out) == files(tmp_path / "new") != before


def test_sms_spam_into_a_full_disk_or_a_read_only_directory(disk, shared_dir, monkeypatch, capsys):
    zip_file = str(shared_dir / "data" / "sms_spam" / "sms_spam_collection.zip")
    out = disk.root / "sms"
    assert cli(monkeypatch, capsys, "data", "sms-spam", "--out", str(out), "--source", zip_file)[0] == 0
    before = files(out)
    disk.leave(8 * PAGE)
    code, stderr = cli(monkeypatch, capsys, "data", "sms-spam", "--out", str(out), "--source", zip_file, "--seed", "1")
    assert code == 1 and "the disk is full" in one_error_line(stderr) and files(out) == before
    disk.release()
    with read_only(out):
        code, stderr = cli(monkeypatch, capsys, "data", "sms-spam", "--out", str(out), "--source", zip_file)
    assert code == 1 and one_error_line(stderr) == f"error: cannot write {out}: permission denied"
    assert files(out) == before
