"""Batch prediction over files of any size: streamed in chunks, resumable, output in input order.

`predict_file` reads the input a chunk at a time and appends each chunk's predictions to
`OUTPUT.partial`, flushed to disk, then records the rows and bytes written so far in
`OUTPUT.partial.json` (an atomic write). If the run is interrupted, the next run with the same
arguments truncates the partial file to the last recorded chunk (dropping any half-written rows),
skips that many input rows and continues; at the end the partial file is renamed to OUTPUT. So an
interrupted and resumed run writes exactly the file an uninterrupted run writes: no row lost or
duplicated. A finished OUTPUT is never replaced unless `overwrite=True`.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import itertools
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent runs on one output are not detected
    fcntl = None  # type: ignore[assignment]

import numpy as np
from tqdm.auto import tqdm

from llmclf import distributed
from llmclf.data.classification import RECORD_SUFFIXES, read_lines, read_records
from llmclf.engines.base import prediction_record
from llmclf.errors import ConfigError, DataError
from llmclf.loaders.tensors import atomic_write_json, write_error
from llmclf.training.calibration import DecisionThreshold
from llmclf.training.state import fault_point

log = logging.getLogger(__name__)

OUTPUT_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
STATE_VERSION = 1


def iter_rows(path: Path, text_col: str) -> Iterator[str]:
    """Texts one at a time from CSV/TSV/JSONL (column `text_col`; `read_records` says what is read
    and what is refused) or plain text (one per line, `read_lines`). Every record is a row, an
    empty text too, so output row i is input row i."""
    if path.suffix.lower() not in RECORD_SUFFIXES:
        yield from read_lines(path)
        return
    for where, (text,) in read_records(path, [text_col]):
        if text is None:
            raise DataError(f"{path}, {where}: {text_col!r} is null")
        yield text


def iter_texts(path: Path, text_col: str, chunk_size: int) -> Iterator[list[str]]:
    """Chunks of `chunk_size` texts (see `iter_rows`)."""
    yield from _chunked(iter_rows(path, text_col), chunk_size)


def _chunked(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def partial_paths(output_path: str | os.PathLike) -> tuple[Path, Path]:
    """(`OUTPUT.partial`, `OUTPUT.partial.json`): the unfinished output and its checkpoint."""
    output_path = Path(output_path)
    return (output_path.with_name(output_path.name + ".partial"),
            output_path.with_name(output_path.name + ".partial.json"))


class _Writer:
    """Encodes prediction rows as CSV/TSV lines or JSON lines (bytes, so offsets are exact)."""

    def __init__(self, fmt: str, text_col: str, classes: list[str], with_std: bool, with_confident: bool,
                 decision: DecisionThreshold | None = None, multi_label: Any = None) -> None:
        self.fmt, self.text_col, self.classes, self.multi_label = fmt, text_col, classes, multi_label
        self.with_std, self.with_confident, self.decision = with_std, with_confident, decision

    def columns(self) -> list[str]:
        return [self.text_col, "label", *(["confident"] if self.with_confident else []),
                *[f"p_{c}" for c in self.classes], *([f"std_{c}" for c in self.classes] if self.with_std else [])]

    def header(self) -> bytes:
        return self._csv([self.columns()]) if self.fmt != "jsonl" else b""

    def _csv(self, rows: list[list[Any]]) -> bytes:
        buf = io.StringIO()
        # CRLF ends (RFC 4180), not LF: only then does the csv module quote a text holding a lone CR
        csv.writer(buf, delimiter="\t" if self.fmt == "tsv" else ",", lineterminator="\r\n").writerows(rows)
        return buf.getvalue().encode("utf-8")

    def encode(self, texts: list[str], mean: np.ndarray, std: np.ndarray | None = None, *,
               confident: list[bool] | None = None, threshold: float | None = None) -> bytes:
        """Rows for `texts` from their probabilities; each row's label and `confident` come from
        `prediction_record`, the one place a prediction is decided."""
        records = [prediction_record(self.classes, mean[i], None if std is None else std[i], threshold=threshold,
                                     confident=None if confident is None else confident[i],
                                     decision=self.decision, multi_label=self.multi_label)
                   for i in range(len(texts))]
        if self.fmt == "jsonl":
            return "".join(json.dumps({self.text_col: text, **record}, ensure_ascii=False) + "\n"
                           for text, record in zip(texts, records, strict=True)).encode("utf-8")
        rows = []
        for i, (text, record) in enumerate(zip(texts, records, strict=True)):
            row: list[Any] = [text, record["label"]]
            if self.with_confident:
                row.append(str(record["confident"]).lower())
            row += [f"{p:.6f}" for p in mean[i]]
            if std is not None:
                row += [f"{s:.6f}" for s in std[i]]
            rows.append(row)
        return self._csv(rows)


@contextlib.contextmanager
def _exclusive(output_path: Path) -> Iterator[None]:
    """Hold `OUTPUT.lock` so that two runs never write the same output at once.

    The lock file is removed when the run ends, so a run that opened it just before must check,
    once it holds the lock, that the file it locked is still the one at that path.
    """
    lock = output_path.with_name(output_path.name + ".lock")
    while True:
        try:
            output_path.parent.mkdir(parents=True, exist_ok=True)
            f = open(lock, "a")  # closed in the finally below, or on retry
        except OSError as exc:  # e.g. a directory the user may not write in
            raise write_error(exc, output_path, any_file=True) from exc
        if fcntl is None:
            break
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise DataError(f"another run is writing {output_path} (it holds {lock}); wait for it to finish "
                            "or choose another --output") from None
        try:
            if os.stat(lock).st_ino == os.fstat(f.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()  # the previous holder removed the file we locked: lock the new one
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        f.close()


def _fingerprint(input_path: Path) -> dict[str, Any]:
    stat = input_path.stat()
    return {"input": str(input_path.resolve()), "input_bytes": stat.st_size, "input_mtime_ns": stat.st_mtime_ns}


def _model_fingerprint(clf: Any) -> str:
    """Backbone plus a hash of what the classifier knows of its training (labels, metrics, ...),
    so that a run is not resumed with another fine-tuned model of the same backbone."""
    info = clf.info()
    digest = hashlib.sha256(json.dumps(info, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{info.get('backbone', '')}#{digest}"


def _fsync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def _append(f, data: bytes, path: Path) -> None:
    """Write all of `data` to the unbuffered file `f` and fsync it; a failure (e.g. the disk is full)
    raises WriteError naming `path`, and nothing of `data` is left in a buffer to be written later."""
    try:
        view = memoryview(data)
        while view:
            view = view[f.write(view):]
        _fsync(f)
    except OSError as exc:
        raise write_error(exc, path, any_file=True) from exc


def predict_texts(clf: Any, texts: list[str], batch_size: int = 32, mc_dropout: int | None = None,
                  threshold: float | None = None, dropout_rate: float | None = None,
                  seed: int | None = None, explain: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One prediction record per text (`engines.base.prediction_record`: label, probabilities and, with
    `mc_dropout` passes, std; `confident` when a threshold is given), in input order. With `explain`
    (options of `llmclf.explain.explain`: method, steps), each record gets the text's `explanation`."""
    if mc_dropout is not None:
        if explain is not None:
            raise ConfigError("explanations are of one deterministic pass's label; leave out --mc-dropout")
        return clf.predict_mc_dropout(texts, passes=mc_dropout, threshold=threshold, batch_size=batch_size,
                                      dropout_rate=dropout_rate, seed=seed).records()
    records = []
    probabilities = clf.predict_proba(texts, batch_size)
    for row in probabilities:
        record = prediction_record(clf.classes_, row, threshold=threshold, decision=clf.decision,
                                   multi_label=getattr(clf, "label_thresholds", None))
        if "confident" in record:  # one pass: --json output has always put `confident` last
            record["confident"] = record.pop("confident")
        records.append(record)
    if explain is not None:
        from llmclf.explain import explain as explain_texts

        for record, explanation in zip(records, explain_texts(clf, texts, batch_size=batch_size,
                                                              probabilities=probabilities, **explain), strict=True):
            record["explanation"] = explanation.to_dict()
    return records


def predict_file(clf: Any, input_path: str | os.PathLike, output_path: str | os.PathLike, text_col: str = "text",
                 batch_size: int = 32, chunk_size: int = 1024, mc_dropout: int | None = None,
                 threshold: float | None = None, dropout_rate: float | None = None, seed: int | None = None,
                 restart: bool = False, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Classify every text of `input_path` into `output_path` (.csv, .tsv or .jsonl), streamed and
    resumable (see the module docstring).

    Each output row holds the text, `label`, one `p_<class>` probability per class and, with
    `mc_dropout` passes, the `std_<class>` over the passes and `confident` (the label's mean
    probability reached `threshold`; also written for one pass when a threshold is given).
    `seed` makes MC-dropout reproducible (chunk starting at row r uses seed + r).

    Args:
        restart: discard an unfinished previous run instead of resuming it.
        overwrite: replace a finished `output_path` (else that is an error).
        progress: show a progress bar with the throughput (texts/s) on stderr.

    Returns: rows (in the output), new_rows (classified in this call), resumed_from, seconds
    and texts_per_second (this call's inference and writing).
    """
    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.is_file():
        raise DataError(f"input file not found: {input_path}")
    fmt = OUTPUT_FORMATS.get(output_path.suffix.lower())
    if fmt is None:
        raise DataError(f"{output_path}: the output must end in .csv, .tsv or .jsonl")
    if chunk_size < 1 or batch_size < 1:
        raise DataError(f"chunk_size and batch_size must be >= 1, got {chunk_size} and {batch_size}")
    if not distributed.is_main():
        return _predict_file(clf, input_path, output_path, fmt, text_col, batch_size, chunk_size, mc_dropout,
                             threshold, dropout_rate, seed, restart, overwrite, progress=False)
    with _exclusive(output_path):
        return _predict_file(clf, input_path, output_path, fmt, text_col, batch_size, chunk_size, mc_dropout,
                             threshold, dropout_rate, seed, restart, overwrite, progress)


def _predict_file(clf: Any, input_path: Path, output_path: Path, fmt: str, text_col: str, batch_size: int,
                  chunk_size: int, mc_dropout: int | None, threshold: float | None, dropout_rate: float | None,
                  seed: int | None, restart: bool, overwrite: bool, progress: bool) -> dict[str, Any]:
    """The streaming loop. Under several processes, rounds of world-size chunks: rank r classifies
    chunk r of each round, rank 0 gathers the encoded rows and alone touches the files."""
    main = distributed.is_main()
    partial, state_file = partial_paths(output_path)
    classes = list(clf.classes_)
    decision, multi = getattr(clf, "decision", None), getattr(clf, "label_thresholds", None)
    writer = _Writer(fmt, text_col, classes, with_std=mc_dropout is not None,
                     with_confident=mc_dropout is not None or threshold is not None, decision=decision,
                     multi_label=multi)
    settings = {"version": STATE_VERSION, **_fingerprint(input_path), "text_col": text_col, "format": fmt,
                "columns": writer.columns(), "model": _model_fingerprint(clf), "mc_dropout": mc_dropout,
                "threshold": threshold, "dropout_rate": dropout_rate, "seed": seed,
                # MC-dropout seeds follow chunk starts, so another chunk size would give other rows
                "chunk_size": chunk_size if mc_dropout is not None else None}

    start_point: tuple[int, int] | DataError | None = None
    if main:
        try:
            start_point = _start(output_path, partial, state_file, settings, writer, restart, overwrite)
        except DataError as exc:
            start_point = exc
    start_point = distributed.broadcast(start_point)  # every rank starts where rank 0 does, or fails with it
    if isinstance(start_point, DataError):
        raise start_point
    done_rows, done_bytes = start_point
    resumed_from, rows = done_rows, done_rows

    start = time.perf_counter()
    bar = tqdm(desc="predict", unit="text", initial=rows, disable=not progress, dynamic_ncols=True)
    def classify(texts: list[str], first_row: int) -> bytes:
        if mc_dropout is not None:
            result = clf.predict_mc_dropout(texts, passes=mc_dropout, threshold=threshold, batch_size=batch_size,
                                            dropout_rate=dropout_rate, seed=None if seed is None else seed + first_row)
            return writer.encode(texts, result.mean, result.std, confident=result.confident)
        return writer.encode(texts, np.asarray(clf.predict_proba(texts, batch_size)), threshold=threshold)

    world, rank = distributed.world_size(), distributed.rank()
    try:
        with open(partial, "r+b", buffering=0) if main else contextlib.nullcontext() as out:
            if out is not None:
                out.truncate(done_bytes)  # drop rows written after the last checkpoint
                out.seek(done_bytes)
            texts_iter = iter_rows(input_path, text_col)
            skipped = sum(1 for _ in zip(range(rows), texts_iter, strict=False))
            if skipped < rows:
                raise DataError(f"{input_path} has {skipped} rows but {partial} already holds {rows}: "
                                "the input changed; pass --restart to start over")
            chunks = _chunked(texts_iter, chunk_size)
            while chunks_round := list(itertools.islice(chunks, world)):
                starts = [rows + sum(len(c) for c in chunks_round[:i]) for i in range(len(chunks_round))]
                mine = classify(chunks_round[rank], starts[rank]) if rank < len(chunks_round) else b""
                data = b"".join(distributed.all_gather(mine))  # rank order = chunk order
                n = sum(len(c) for c in chunks_round)
                if out is not None:
                    _append(out, data, partial)
                    atomic_write_json(state_file, {**settings, "rows": rows + n, "bytes": out.tell()})
                rows += n  # saved
                bar.update(n)
                fault_point("rows", rows)
    except BaseException:
        bar.close()
        if not main:
            raise
        if rows == 0:  # nothing worth keeping
            partial.unlink(missing_ok=True)
            state_file.unlink(missing_ok=True)
        else:
            log.warning("stopped after %d rows; %s keeps them: rerun the same command to resume "
                        "(or pass --restart to start over)", rows, partial)
        raise
    bar.close()
    if main:
        os.replace(partial, output_path)
        state_file.unlink(missing_ok=True)
    distributed.barrier()
    seconds = time.perf_counter() - start
    new_rows = rows - resumed_from
    return {"rows": rows, "new_rows": new_rows, "resumed_from": resumed_from, "seconds": seconds,
            "texts_per_second": new_rows / seconds if seconds > 0 else 0.0, "output": str(output_path)}


def _start(output_path: Path, partial: Path, state_file: Path, settings: dict[str, Any], writer: _Writer,
           restart: bool, overwrite: bool) -> tuple[int, int]:
    """(rows, bytes) already in `partial`: those of an unfinished run to resume, else (0, header size)
    of a fresh partial file."""
    if output_path.exists() and not overwrite:
        raise DataError(f"{output_path} already exists (a finished run); pass --overwrite to replace it "
                        "or choose another --output")
    if restart:
        partial.unlink(missing_ok=True)
        state_file.unlink(missing_ok=True)
    done_rows, done_bytes = _resume_point(partial, state_file, settings)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    if done_rows is not None:
        log.info("resuming %s after %d rows (pass --restart to start over)", partial, done_rows)
        return done_rows, done_bytes
    with open(partial, "wb", buffering=0) as f:
        _append(f, writer.header(), partial)
        done_bytes = f.tell()
    atomic_write_json(state_file, {**settings, "rows": 0, "bytes": done_bytes})
    return 0, done_bytes


def _resume_point(partial: Path, state_file: Path, settings: dict[str, Any]) -> tuple[int | None, int | None]:
    """(rows, bytes) recorded for an unfinished run with the same settings, or (None, None)."""
    if not partial.exists():
        state_file.unlink(missing_ok=True)
        return None, None
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        log.info("%s has no readable checkpoint (%s); starting over", partial, state_file)
        return None, None
    changed = [f"{k}: {state.get(k)!r} then, {v!r} now" for k, v in settings.items() if state.get(k) != v]
    if changed:
        raise DataError(f"{partial} is an unfinished run with other settings or input ({'; '.join(changed)}); "
                        "rerun with the same arguments to resume it, or pass --restart to start over")
    rows, size = int(state["rows"]), int(state["bytes"])
    if partial.stat().st_size < size:
        raise DataError(f"{partial} is shorter ({partial.stat().st_size} bytes) than its checkpoint says "
                        f"({size} bytes); pass --restart to start over")
    return rows, size
