"""Batch prediction over files: streamed in chunks, output in input order, written atomically."""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from llmclf.errors import DataError
from llmclf.loaders.tensors import atomic_path


def iter_texts(path: Path, text_col: str, chunk_size: int) -> Iterator[list[str]]:
    """Chunks of texts from CSV/TSV/JSONL (column `text_col`) or plain text (one per line)."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        reader = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False,
                             chunksize=chunk_size)
        for chunk in reader:
            if text_col not in chunk.columns:
                raise DataError(f"{path} has no column {text_col!r} (columns: {', '.join(chunk.columns)})")
            yield chunk[text_col].tolist()
    elif suffix in (".jsonl", ".ndjson"):
        yield from _chunked(_jsonl_texts(path, text_col), chunk_size)
    else:
        with open(path, encoding="utf-8") as f:
            yield from _chunked((line.rstrip("\n") for line in f), chunk_size)


def _jsonl_texts(path: Path, text_col: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield str(json.loads(line)[text_col])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataError(f"{path}, line {line_no}: no JSON object with a {text_col!r} field") from exc


def _chunked(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def predict_file(clf, input_path: str | os.PathLike, output_path: str | os.PathLike, text_col: str = "text",
                 batch_size: int = 32, chunk_size: int = 1024) -> dict:
    """Classify every text of `input_path` into `output_path` (.csv or .jsonl): the text, `label`
    and one probability column per class, in input order. Returns rows and seconds."""
    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.is_file():
        raise DataError(f"input file not found: {input_path}")
    as_jsonl = output_path.suffix.lower() in (".jsonl", ".ndjson")
    start, rows = time.perf_counter(), 0
    with atomic_path(output_path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as out:
        writer = None
        if not as_jsonl:
            writer = csv.writer(out)
            writer.writerow([text_col, "label", *[f"p_{c}" for c in clf.classes_]])
        bar = tqdm(desc="predict", unit="text")
        for texts in iter_texts(input_path, text_col, chunk_size):
            probs = clf.predict_proba(texts, batch_size)
            for text, row in zip(texts, probs, strict=True):
                label = clf.classes_[int(row.argmax())]
                if as_jsonl:
                    record = {text_col: text, "label": label,
                              "probabilities": {c: float(p) for c, p in zip(clf.classes_, row, strict=True)}}
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
                else:
                    writer.writerow([text, label, *[f"{p:.6f}" for p in row]])
            rows += len(texts)
            bar.update(len(texts))
        bar.close()
    return {"rows": rows, "seconds": time.perf_counter() - start}
