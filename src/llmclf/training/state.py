"""Training runs that survive being killed: the run's fingerprint, resumable training states,
and the checks `--resume` makes.

A run writes `OUT/checkpoints/run.json` (what it trains: engine, backbone, result-changing
options, data checksums) when it starts, then complete training states into `OUT/checkpoints/`
after every epoch and every `--save-every` steps: the scratch engine as `state-STEP.pt` (torch,
read back with `weights_only=True`), the hf engine as Trainer's `checkpoint-STEP/` directories.
Each is written to a temporary name and renamed (scratch) or marked complete once written (hf),
and the previous one is kept, so a process killed at any point leaves a complete state to
resume from. When the finished model is saved, `checkpoints/` is removed and the fingerprint
moves into the model's config.json (`"run"`). In a one-process run, SIGINT or SIGTERM stops training
at the next optimizer step once its state is saved (`stop_requests`, TrainingInterruptedError); a
write that fails (disk full, permission denied) raises WriteError and leaves the states before intact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmclf.errors import CheckpointError, ConfigError, LlmclfError
from llmclf.loaders.checkpoint import read_checkpoint_config
from llmclf.loaders.tensors import WriteError, atomic_path, atomic_write_json, load_torch_file, write_error

log = logging.getLogger(__name__)

STATE_DIR = "checkpoints"
RUN_FILE = "run.json"
STATE_PREFIX = "state-"
KEEP_STATES = 2  # the newest and the one before, in case the newest turns out damaged
FAULT_ENV = "LLMCLF_FAULT"  # test hook: "step:N" or "save:N" kills the process there with SIGKILL


def _fault_signal(event: str, step: int) -> signal.Signals | None:
    """The signal $LLMCLF_FAULT asks for at `event` `step` (SIGKILL unless it names one), else None."""
    spec = os.environ.get(FAULT_ENV, "")
    where, _, rank = spec.partition("@")
    name, _, rest = where.partition(":")
    number, _, signal_name = rest.partition(":")
    if f"{name}:{number}" != f"{event}:{step}":
        return None
    if rank and rank != os.environ.get("RANK", "0"):
        return None
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) != 0:  # a restarted group runs on
        return None
    return signal.Signals[signal_name] if signal_name else signal.SIGKILL


def fault_point(event: str, step: int) -> None:
    """SIGKILL this process at `event` when $LLMCLF_FAULT says so ("step:N": after optimizer step N,
    before its state is saved; "save:N": while the state of step N is written, i.e. halfway through
    the file (scratch) or after Trainer wrote checkpoint-N but before it is marked complete (hf);
    "rows:N": once batch prediction has saved N rows; "step:N@R" etc.: only the worker of rank R, and only
    before the elastic agent restarted the group; "step:N:SIGTERM" etc.: send that signal instead, as a
    user or a scheduler would). The resume, fault-tolerance and signal tests stop runs this way."""
    fault = _fault_signal(event, step)
    if fault is not None:
        os.kill(os.getpid(), fault)


# --- stopping on SIGINT / SIGTERM ----------------------------------------------------------------

class TrainingInterruptedError(LlmclfError):
    """Training stopped on SIGINT or SIGTERM once its state was saved; `resume=True` (`--resume`)
    continues it. `exit_code` is the shell's for that signal: 128 + its number (130, 143)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum, self.exit_code = signum, 128 + signum


class Interrupted(BaseException):
    """SIGINT or SIGTERM as an exception where the program is, so that cleanups and `finally` blocks
    run: what the CLI's handlers raise (`raise_interrupted`; not in torchrun's workers). Not a
    KeyboardInterrupt, which click would turn into exit code 1. `exit_code`: 128 + the signal's number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum, self.exit_code = signum, 128 + signum


def raise_interrupted(signum: int, frame: Any) -> None:
    """A signal handler: raise `Interrupted`."""
    raise Interrupted(signum)


@dataclass
class StopRequest:
    """The signal received while `stop_requests` was active (None: none yet)."""

    signum: int | None = None


@contextlib.contextmanager
def stop_requests(enabled: bool = True) -> Iterator[StopRequest]:
    """While the block runs, SIGINT and SIGTERM only record themselves in the yielded StopRequest, for a
    training loop to save its state and stop at its next step boundary; a second one acts as it would
    have without this (KeyboardInterrupt, Interrupted, or the default: the process ends). Not `enabled`,
    outside the main thread, or for a signal that is ignored: signals act as before."""
    request = StopRequest()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: Any) -> None:
        if request.signum is None:
            request.signum = signum
            log.warning("%s: training stops after this optimizer step, once its state is saved (send it again "
                        "to stop at once; the state saved before is kept)", signal.Signals(signum).name)
            return
        old = previous[signum]
        if callable(old):
            old(signum, frame)
        else:  # the default action, as if this handler had never been installed
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    handled = [s for s, old in previous.items() if old is not signal.SIG_IGN]
    for s in handled:
        signal.signal(s, handler)
    try:
        yield request
    finally:
        for s in handled:
            signal.signal(s, previous[s] if previous[s] is not None else signal.SIG_DFL)


def texts_checksum(texts: list[str], labels: list[str]) -> str:
    """sha256 of the texts and labels, in order (what a run trained on)."""
    digest = hashlib.sha256()
    for text, label in zip(texts, labels, strict=True):
        digest.update(json.dumps([text, label], ensure_ascii=False).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def run_fingerprint(engine: str, backbone: str, options: dict[str, Any], train: Any, val: Any,
                    model_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a run's result depends on; `--resume` requires it unchanged."""
    return {"engine": engine, "backbone": backbone, "options": options,
            "model_options": {k: str(v) if isinstance(v, os.PathLike) else v
                              for k, v in (model_options or {}).items() if v not in (None, False)},
            "data": {"train": texts_checksum(train.texts, train.labels),
                     "validation": texts_checksum(val.texts, val.labels)}}


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    out = []
    for key in ("engine", "backbone"):
        if saved.get(key) != current.get(key):
            out.append(f"{key} {saved.get(key)!r} (now {current.get(key)!r})")
    for name in sorted(set(saved.get("options", {})) | set(current["options"])):
        old, new = saved.get("options", {}).get(name), current["options"].get(name)
        if old != new:
            out.append(f"{name} {old!r} (now {new!r})")
    if saved.get("model_options", {}) != current["model_options"]:
        out.append(f"model options {saved.get('model_options')} (now {current['model_options']})")
    for split in ("train", "validation"):
        if saved.get("data", {}).get(split) != current["data"][split]:
            out.append(f"{split} data (its checksum differs)")
    return out


class RunFinishedError(Exception):
    """`--resume` on a run that already finished (same fingerprint): nothing to do."""


def prepare_run(out_dir: str | os.PathLike | None, fingerprint: dict[str, Any], resume: bool) -> bool:
    """Check `out_dir` before training; True when an unfinished run is to be resumed.

    Raises RunFinishedError for `resume` on a finished run with this fingerprint, and ConfigError for
    `resume` with nothing to resume or another run's directory, and for a fresh start over an
    unfinished run (which `--resume` would continue)."""
    if out_dir is None:
        if resume:
            raise ConfigError("resume needs the output directory of the run to continue")
        return False
    out_dir = Path(out_dir)
    run_file = out_dir / STATE_DIR / RUN_FILE
    saved: dict[str, Any] | None = None
    if run_file.is_file():
        try:
            saved = json.loads(run_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{run_file} is unreadable ({exc}); delete {out_dir / STATE_DIR} to start "
                                  "the run over") from exc
        if not resume:
            raise ConfigError(f"{out_dir} holds an unfinished training run ({out_dir / STATE_DIR}); continue it "
                              f"with --resume, or delete {out_dir / STATE_DIR} to start over")
        finished = False
    elif resume:
        config = read_checkpoint_config(out_dir, required=False)
        if config is None or "run" not in config:
            raise ConfigError(f"nothing to resume in {out_dir}: it holds no training state ({STATE_DIR}/{RUN_FILE}) "
                              "and no finished llmclf run; start the run without --resume")
        saved, finished = config["run"], True
    else:
        return False
    differences = _differences(saved, fingerprint)
    if differences:
        raise ConfigError(f"cannot resume the run in {out_dir}: it was started with other settings or data: "
                          + "; ".join(differences) + ". Resume with the same arguments and data, or choose "
                          "another --out")
    if finished:
        raise RunFinishedError(f"the run in {out_dir} already finished; nothing to resume")
    return True


def has_unfinished_run(out_dir: str | os.PathLike) -> bool:
    """Whether `out_dir` holds a run's training states (started, not finished)."""
    return (Path(out_dir) / STATE_DIR / RUN_FILE).is_file()


def start_run(out_dir: str | os.PathLike, fingerprint: dict[str, Any]) -> Path:
    """Create `OUT/checkpoints/` with the run's fingerprint; returns the directory."""
    state_dir = Path(out_dir) / STATE_DIR
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # e.g. a directory the user may not write in
        raise write_error(exc, state_dir, any_file=True) from exc
    atomic_write_json(state_dir / RUN_FILE, fingerprint)
    return state_dir


def finish_run(out_dir: str | os.PathLike) -> None:
    """Remove the training states once the finished model is saved."""
    shutil.rmtree(Path(out_dir) / STATE_DIR, ignore_errors=True)


# --- the scratch engine's training states ------------------------------------------------------

def save_training_state(state_dir: Path, step: int, state: dict[str, Any]) -> Path:
    """Write `state` as `state-STEP.pt` (temporary name, then rename); keep the newest two. A write that
    fails (disk full, permission denied) raises WriteError; the states saved before stay intact."""
    path = state_dir / f"{STATE_PREFIX}{step:08d}.pt"
    fault = _fault_signal("save", step)
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                torch.save(state, f)  # to a Python file: a failed write raises OSError (ENOSPC ...)
            if fault == signal.SIGKILL:
                with open(tmp, "r+b") as f:
                    f.truncate(tmp.stat().st_size // 2)
            if fault is not None:
                os.kill(os.getpid(), fault)
    except WriteError as exc:
        exc.note = "; the training states saved before are intact: make room, then continue the run with --resume"
        raise
    for old in sorted(state_dir.glob(f"{STATE_PREFIX}*.pt"))[:-KEEP_STATES]:
        old.unlink(missing_ok=True)
    return path


def load_training_state(state_dir: Path) -> dict[str, Any] | None:
    """The newest training state that loads; damaged ones (e.g. truncated by a crash) are skipped
    with a warning. None when there is none yet."""
    for leftover in state_dir.glob(f".{STATE_PREFIX}*.tmp"):  # a write the process did not finish
        leftover.unlink(missing_ok=True)
    damaged = []
    for path in sorted(state_dir.glob(f"{STATE_PREFIX}*.pt"), reverse=True):
        try:
            state = load_torch_file(path)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped, and said so
            damaged.append(path)
            log.warning("training state %s is damaged or incomplete (%s: %s); trying the previous one",
                        path, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            continue
        if damaged:
            log.warning("resuming from %s, the newest complete training state (skipped %s)", path.name,
                        ", ".join(p.name for p in damaged))
        return state
    if damaged:
        log.warning("no complete training state in %s; starting the run from the beginning", state_dir)
    return None
