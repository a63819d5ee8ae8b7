"""Labelled text data: read CSV/TSV/JSONL, split, tokenise and batch with dynamic padding."""

from __future__ import annotations

import csv
import json
import math
import os
import random
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from llmclf.errors import DataError
from llmclf.loaders.paths import leaves_folder
from llmclf.loaders.tensors import atomic_files, atomic_path


@dataclass
class LabelledTexts:
    texts: list[str]
    labels: list[str]
    source: str = ""
    label_sep: str | None = None  # multi-label: each label is a text's labels joined by it (llmclf.multilabel)

    def __len__(self) -> int:
        return len(self.texts)


# Suffixes read as records with named columns, streamed: CSV/TSV with a header, JSON lines.
RECORD_SUFFIXES = (".csv", ".tsv", ".tab", ".jsonl", ".ndjson")
_CSV_FIELD_LIMIT = 2**31 - 1  # the csv module's default (128 KiB) refuses long texts; a C long bounds it


def read_records(path: str | os.PathLike, columns: list[str],
                 list_column: str | None = None) -> Iterator[tuple[str, list[str | list | None]]]:
    """(where, values of `columns`) of each record of a CSV or TSV file with a header, a JSON-lines
    file or (`.json`) a JSON array of objects; all but `.json` streamed.

    `where` names the record in messages: `row N` of a CSV/TSV (the header is row 1, as in a
    spreadsheet; ` (line L)` is added where the row starts on another line, e.g. after a text with
    line breaks), `line N` of JSON lines, `record N` of a JSON array. CSV values are strings as
    written (quotes resolved, nothing stripped); JSON numbers and booleans become strings, null
    None. Blank lines are no records. A leading UTF-8 BOM is dropped. Anything else that is not
    clean data raises DataError naming the file and line: bytes that are not UTF-8, a quote that
    is not closed or is followed by more text, a row with more or fewer fields than the header, a
    line that is not a JSON object, a missing column or key, a JSON array or object as a value, and
    a JSON string with half a surrogate pair (`"\\ud800"`, which is no Unicode text). In JSON, the
    `list_column` may hold a list (a multi-label text's labels), returned as a Python list.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return _json_records(path, columns, lines=suffix != ".json", list_column=list_column)
    return _csv_records(path, columns, "\t" if suffix in (".tsv", ".tab") else ",")


def read_lines(path: str | os.PathLike) -> Iterator[str]:
    """The lines of a UTF-8 text file without their ends (\\n, \\r\\n or \\r), streamed; a leading BOM
    is dropped. Bytes that are not UTF-8 raise DataError naming the line."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8-sig") as f:
            for line in f:
                yield line.rstrip("\n")
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc) from None


def _csv_records(path: Path, columns: list[str], sep: str) -> Iterator[tuple[str, list[str | None]]]:
    kind = "TSV" if sep == "\t" else "CSV"
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter=sep, strict=True)
            try:
                header = next(reader, None)
                if header is None:
                    raise DataError(f"{path} is empty: a {kind} file starts with a header naming its columns")
                index = _column_index(path, header, columns)
                row, last_line = 1, reader.line_num
                for fields in reader:
                    first_line, last_line = last_line + 1, reader.line_num
                    if not fields:  # a blank line
                        continue
                    row += 1
                    where = f"row {row}" + (f" (line {first_line})" if first_line != row else "")
                    if len(fields) != len(header):
                        raise DataError(f"{path}, {where}: {len(fields)} field(s) where the header has {len(header)}; "
                                        f"a text holding {'a tab' if kind == 'TSV' else 'a comma'}, a quote or a line "
                                        'break must be quoted ("...", with "" for a quote inside)')
                    yield where, [fields[i] for i in index]
            except csv.Error as exc:
                raise DataError(f"{path}, line {reader.line_num}: not valid {kind}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc) from None


def _column_index(path: Path, header: list[str], columns: list[str]) -> list[int]:
    for column in columns:
        if column not in header:
            raise DataError(f"{path} has no column {column!r} (columns: {', '.join(header)}); "
                            "choose others with --text-col / --label-col")
        if header.count(column) > 1:
            raise DataError(f"{path}: the header names the column {column!r} {header.count(column)} times")
    return [header.index(column) for column in columns]


def _json_records(path: Path, columns: list[str], lines: bool,
                  list_column: str | None = None) -> Iterator[tuple[str, list[str | list | None]]]:
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    try:
        if lines:
            with open(path, encoding="utf-8-sig", newline="\n") as f:  # JSON lines end in \n (or \r\n)
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line, parse_constant=refuse)
                    except ValueError as exc:
                        raise DataError(f"{path}, line {n}: not a JSON object: {exc}") from None
                    yield f"line {n}", _json_values(path, f"line {n}", record, columns, list_column)
        else:
            try:
                records = json.loads(path.read_text(encoding="utf-8-sig"), parse_constant=refuse)
            except ValueError as exc:
                if isinstance(exc, UnicodeDecodeError):
                    raise
                raise DataError(f"{path}: not JSON: {exc}") from None
            if not isinstance(records, list):
                raise DataError(f"{path}: a .json file holds an array of objects [{{...}}, ...], "
                                f"this one a JSON {type(records).__name__}")
            for n, record in enumerate(records, 1):
                yield f"record {n}", _json_values(path, f"record {n}", record, columns, list_column)
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc) from None


def _json_values(path: Path, where: str, record: Any, columns: list[str],
                 list_column: str | None = None) -> list[str | list | None]:
    if not isinstance(record, dict):
        raise DataError(f"{path}, {where}: a JSON {type(record).__name__} where an object {{...}} is expected")
    values: list[str | None] = []
    for column in columns:
        if column not in record:
            raise DataError(f"{path}, {where}: no column {column!r} (keys: {', '.join(map(repr, record))}); "
                            "choose others with --text-col / --label-col")
        value = record[column]
        if column == list_column and isinstance(value, list) and not any(isinstance(v, (dict, list)) for v in value):
            values.append(value)
            continue
        if isinstance(value, (dict, list)):
            raise DataError(f"{path}, {where}: {column!r} is a JSON {type(value).__name__}, not a text")
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise DataError(f"{path}, {where}: {column!r} holds {value[exc.start]!r}, half of a UTF-16 "
                                "surrogate pair, which is no Unicode text") from None
        values.append(None if value is None else str(value))
    return values


def _not_utf8(path: Path, exc: UnicodeDecodeError) -> DataError:
    """The error for a file that is not UTF-8 text, naming its first line that is not."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as bad:
                return DataError(f"{path}, line {n}: not UTF-8 text ({bad.reason} at byte {bad.start + 1} of the "
                                 "line); save the file as UTF-8")
    return DataError(f"{path}: not UTF-8 text ({exc.reason}); save the file as UTF-8")


def read_labelled(path: str | os.PathLike, text_col: str = "text", label_col: str | None = "label",
                  label_sep: str | None = None) -> LabelledTexts:
    """Texts and labels (as strings) from a CSV, TSV or JSONL file with a header (see `read_records`).

    Texts are kept as written; labels lose surrounding whitespace. `label_col=None` reads texts only
    (for prediction). A blank or missing text or label is an error that names the row. Multi-label
    (`llmclf.multilabel`): with `label_sep`, each label is a set of labels joined by it; a JSON list as
    the label makes the data multi-label too (joined by `label_sep`, default ","). An empty label set
    is an error that names the row.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    from llmclf import multilabel

    texts, labels, lists = [], [], False
    for where, values in read_records(path, [text_col] + ([label_col] if label_col else []), list_column=label_col):
        if not isinstance(values[0], str) or not values[0].strip():
            raise DataError(f"{path}, {where}: the text is empty")
        texts.append(values[0])
        if label_col:
            if isinstance(values[1], list):
                lists = True
                labels.append(multilabel.join_labels(values[1], label_sep or multilabel.DEFAULT_SEP,
                                                     f"{path}, {where}"))
                continue
            label = (values[1] or "").strip()
            if not label:
                raise DataError(f"{path}, {where}: the label is missing")
            labels.append(multilabel.split_labels(label, label_sep, f"{path}, {where}") if label_sep else label)
    if not texts:
        raise DataError(f"{path} has no rows")
    sep = label_sep or (multilabel.DEFAULT_SEP if lists else None)
    if lists and label_sep is None:  # plain labels beside lists: split by the default separator
        labels = [multilabel.split_labels(label, sep, str(path)) for label in labels]
    return LabelledTexts(texts, labels, str(path), sep)


def label_order(labels: list[str]) -> list[str]:
    """Class names in a fixed order: numerically if all are integers, else alphabetically."""
    unique = set(labels)
    try:
        return sorted(unique, key=int)
    except ValueError:
        return sorted(unique)


def write_labelled(data: LabelledTexts, path: str | os.PathLike) -> None:
    """A `text,label` CSV, written atomically, with CRLF line ends (RFC 4180): then the csv module
    quotes a text holding a lone CR, which with LF ends it would leave bare, splitting the row."""
    with atomic_path(path) as tmp:
        pd.DataFrame({"text": data.texts, "label": data.labels}).to_csv(tmp, index=False, lineterminator="\r\n")


def parse_label_names(spec: str) -> dict[str, str]:
    """`"0=negative,1=positive"` -> {"0": "negative", "1": "positive"}: OLD=NEW pairs separated by
    commas, spaces around each name dropped; every OLD and every NEW once (NEW may hold `=`)."""
    names: dict[str, str] = {}
    for item in spec.split(","):
        old, sep, new = (part.strip() for part in item.partition("="))
        if not sep or not old or not new or old in names:
            raise DataError(f"label names must be OLD=NEW pairs, each OLD once, separated by commas "
                            f"(e.g. 0=negative,1=positive); got {spec!r}")
        if new in names.values():
            first = next(o for o, n in names.items() if n == new)
            raise DataError(f"label names must differ (two labels would merge): {new!r} is given to both {first!r} "
                            f"and {old!r} in {spec!r}")
        names[old] = new
    return names


def rename_labels(data: LabelledTexts, names: dict[str, str]) -> LabelledTexts:
    """The same texts with every label replaced by its name; a label without a name is an error."""
    sep = data.label_sep
    sets = [label.split(sep) for label in data.labels] if sep else [[label] for label in data.labels]
    missing = sorted({name for names in sets for name in names} - set(names))
    if missing:
        raise DataError(f"{data.source} has label(s) {', '.join(map(repr, missing))} without a name; "
                        f"give every label one (given: {', '.join(names)})")
    if sep:
        from llmclf.multilabel import join_labels

        return LabelledTexts(data.texts, [join_labels([names[n] for n in row], sep) for row in sets], data.source, sep)
    return LabelledTexts(data.texts, [names[label] for label in data.labels], data.source)


def split_labelled(data: LabelledTexts, ratios: tuple[float, float, float] = (0.7, 0.1, 0.2),
                   stratify: bool = False, seed: int = 123) -> tuple[LabelledTexts, LabelledTexts, LabelledTexts]:
    """Shuffle and split into train/validation/test by `ratios` (optionally stratified by label).
    A share of 0 gives an empty part: `(0.8, 0.2, 0)` is the usual 80/20 train/evaluation split,
    identical to scikit-learn's `train_test_split(test_size=0.2, random_state=seed)`. Multi-label data
    (`label_sep` set) is stratified by iterative stratification (`llmclf.multilabel.iterative_split`:
    part sizes approximate, every label in train)."""
    from sklearn.model_selection import train_test_split  # slow to import: only when splitting

    if len(ratios) != 3 or not all(math.isfinite(r) and r >= 0 for r in ratios) or abs(sum(ratios) - 1) > 1e-6:
        raise DataError(f"ratios must be three non-negative numbers summing to 1, got {ratios}")
    index = list(range(len(data)))
    n_test = round(len(index) * ratios[2])
    n_val = round(len(index) * ratios[1])
    if (ratios[2] > 0 and n_test == 0) or (ratios[1] > 0 and n_val == 0) or len(index) - n_test - n_val <= 0:
        raise DataError(f"{len(index)} rows are too few for the split {ratios}")

    if stratify and data.label_sep:
        from llmclf.multilabel import iterative_split

        train, val, test = iterative_split([label.split(data.label_sep) for label in data.labels],
                                           (ratios[0], ratios[1], ratios[2]), seed)
        return tuple(LabelledTexts([data.texts[i] for i in ids], [data.labels[i] for i in ids], data.source,
                                   data.label_sep) for ids in (train, val, test))

    def split(ids: list[int], n: int) -> tuple[list[int], list[int]]:
        if n == 0:
            return ids, []
        strat = [data.labels[i] for i in ids] if stratify else None
        return train_test_split(ids, test_size=n, random_state=seed, stratify=strat)

    try:
        rest, test = split(index, n_test)
        train, val = split(rest, n_val)
    except ValueError as exc:
        raise DataError(f"cannot split {data.source}: {exc}") from exc

    def subset(ids: list[int]) -> LabelledTexts:
        return LabelledTexts([data.texts[i] for i in ids], [data.labels[i] for i in ids], data.source,
                             data.label_sep)

    return subset(train), subset(val), subset(test)


SPLITS = ("train", "validation", "test")


def split_file(path: str | os.PathLike, out_dir: str | os.PathLike,
               ratios: tuple[float, float, float] = (0.7, 0.1, 0.2), stratify: bool = False, seed: int = 123,
               text_col: str = "text", label_col: str = "label",
               label_names: str | dict[str, str] | None = None,
               label_sep: str | None = None) -> dict[str, tuple[int, bool]]:
    """Split the labelled file `path` into `out_dir`/train.csv, validation.csv, test.csv (columns
    text,label; `split_labelled`), written together: never a mix of two splits. A share of 0 writes no
    file and removes the one an earlier split left. `label_names` renames the labels ("0=negative,..."
    or a dict). `label_sep` reads multi-label data (labels joined by it, written back the same way; JSON
    lists are written joined by ","). Returns, per split, its rows and whether an earlier split's file was
    removed."""
    data = read_labelled(path, text_col, label_col, label_sep)
    if label_names:
        data = rename_labels(data, parse_label_names(label_names) if isinstance(label_names, str) else label_names)
    parts = split_labelled(data, ratios, stratify, seed)
    out_dir = Path(out_dir)
    with atomic_files(out_dir) as staging:  # the files together: never a mix of two splits (test rows in train)
        for name, part in zip(SPLITS, parts, strict=True):
            if len(part) > 0:
                write_labelled(part, staging / f"{name}.csv")
    result = {}
    for name, part in zip(SPLITS, parts, strict=True):
        stale = not len(part) and (out_dir / f"{name}.csv").is_file()
        if stale:  # an earlier split's rows, now partly in the other files: using it would leak them
            (out_dir / f"{name}.csv").unlink()
        result[name] = (len(part), stale)
    return result


# --- the UCI SMS Spam Collection, split as the course splits it -----------------------------------

SMS_SPAM_URLS = (
    "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",  # the course's address
    "https://f001.backblazeb2.com/file/LLMs-from-scratch/sms%2Bspam%2Bcollection.zip",  # its fallback
)
SMS_SPAM_ZIP_SHA256 = "1587ea43e58e82b14ff1f5425c88e17f8496bfcdb67a583dbff9eefaf9963ce3"
SMS_SPAM_MEMBER = "SMSSpamCollection"
SMS_SPAM_MAX_BYTES = 64 << 20  # the real file is 477 KB; a bigger member is a zip bomb or the wrong file


def read_sms_spam(source: str | os.PathLike) -> pd.DataFrame:
    """All 5,574 messages (`label`, `text`) of the raw file or the original zip.

    Read with quoting off: a message that starts with a double quote would otherwise swallow
    the next lines (pandas' default reads only 5,572 rows). From a zip, only the SMSSpamCollection
    member is read, in memory (nothing is extracted); an archive with a member whose name leads
    outside it (zip-slip) or a member over SMS_SPAM_MAX_BYTES (zip bomb) is refused.
    """
    path = Path(source)
    if not path.is_file():
        raise DataError(f"SMS spam source not found: {path}")
    if zipfile.is_zipfile(path):
        data = _read_sms_zip(path)
    elif path.stat().st_size > SMS_SPAM_MAX_BYTES:
        raise DataError(f"{path} has {path.stat().st_size:,} bytes; the SMS spam file has 477 KB (limit "
                        f"{SMS_SPAM_MAX_BYTES:,}): is it the right file?")
    else:
        data = path.read_bytes()
    try:
        raw = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: the SMS spam file is not UTF-8 text ({exc})") from exc
    rows = list(csv.reader(raw.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE))
    bad = [i + 1 for i, row in enumerate(rows) if len(row) != 2 or row[0] not in ("ham", "spam")]
    if bad:
        raise DataError(f"{path}: line {bad[0]} is not 'ham|spam<TAB>text' ({len(bad)} bad line(s))")
    return pd.DataFrame(rows, columns=["label", "text"])


def _read_sms_zip(path: Path) -> bytes:
    """The SMSSpamCollection member of a zip, after checking every member's name and size."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            for info in members:
                if leaves_folder(info.filename):
                    raise DataError(f"{path} has a member named {info.filename!r}, which would be written outside "
                                    "the folder it is unpacked to (zip-slip); refusing the archive")
            member = next((info for info in members if info.filename == SMS_SPAM_MEMBER), None)
            if member is None:
                raise DataError(f"{path} has no {SMS_SPAM_MEMBER} file")
            if member.file_size > SMS_SPAM_MAX_BYTES:
                raise DataError(f"{path}: {SMS_SPAM_MEMBER} unpacks to {member.file_size:,} bytes (the real file is "
                                f"477 KB; the limit is {SMS_SPAM_MAX_BYTES:,}); refusing a zip bomb or wrong file")
            # Read in blocks: zipfile stops at the declared size and then checks the CRC, so a member
            # that lies about its size unpacks to at most one block more (`archive.read` would
            # inflate all of it first).
            blocks = []
            with archive.open(member) as stream:
                while block := stream.read(1 << 20):
                    blocks.append(block)
            return b"".join(blocks)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, OSError, EOFError) as exc:
        raise DataError(f"{path} is not a readable zip archive: {type(exc).__name__}: {exc}") from exc


def download_sms_spam(cache_dir: str | os.PathLike) -> Path:
    """The UCI archive, downloaded once (course address, then fallback) and checked by sha256."""
    import hashlib
    import urllib.request

    target = Path(cache_dir) / "sms_spam_collection.zip"
    if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == SMS_SPAM_ZIP_SHA256:
        return target
    errors = []
    for url in SMS_SPAM_URLS:
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                data = response.read()
        except OSError as exc:
            errors.append(f"{url}: {exc}")
            continue
        if hashlib.sha256(data).hexdigest() != SMS_SPAM_ZIP_SHA256:
            errors.append(f"{url}: sha256 mismatch")
            continue
        with atomic_path(target) as tmp:
            tmp.write_bytes(data)
        return target
    raise DataError("could not download the SMS Spam Collection (" + "; ".join(errors) + "). "
                    "Pass --source with a local SMSSpamCollection file or its zip")


def course_split(frame: pd.DataFrame, balance: bool = True, seed: int = 123,
                 train_frac: float = 0.7, validation_frac: float = 0.1) -> tuple[pd.DataFrame, ...]:
    """The course's `create_balanced_dataset` + `random_split` (pandas sampling, same seeds)."""
    if balance:
        spam = frame[frame["label"] == "spam"]
        ham = frame[frame["label"] == "ham"].sample(len(spam), random_state=seed)
        frame = pd.concat([ham, spam])
    frame = frame.sample(frac=1, random_state=seed).reset_index(drop=True)
    train_end = int(len(frame) * train_frac)
    validation_end = train_end + int(len(frame) * validation_frac)
    return frame[:train_end], frame[train_end:validation_end], frame[validation_end:]


def prepare_sms_spam(out_dir: str | os.PathLike, source: str | os.PathLike | None = None, seed: int = 123,
                     balance: bool = True, cache_dir: str | os.PathLike | None = None) -> dict[str, dict[str, int]]:
    """Write train/validation/test CSVs (`text,label`) of the SMS spam data, the three files together
    (never a mix of two splits); returns counts per split."""
    if source is None or str(source).startswith(("http://", "https://")):
        cache = Path(cache_dir or Path.home() / ".cache" / "llmclf")
        source = download_sms_spam(cache) if source is None else _download_url(str(source), cache)
    frame = read_sms_spam(source)
    counts = {}
    with atomic_files(out_dir) as staging:
        for name, part in zip(SPLITS, course_split(frame, balance, seed), strict=True):
            write_labelled(LabelledTexts(part["text"].tolist(), part["label"].tolist()), staging / f"{name}.csv")
            counts[name] = {"rows": len(part), **part["label"].value_counts().sort_index().to_dict()}
    return counts


def _download_url(url: str, cache: Path) -> Path:
    import urllib.request

    target = cache / Path(url).name
    try:
        with urllib.request.urlopen(url, timeout=60) as response, atomic_path(target) as tmp:
            tmp.write_bytes(response.read())
    except OSError as exc:
        raise DataError(f"could not download {url}: {exc}") from exc
    return target


# --- tokenised batches --------------------------------------------------------------------------

@dataclass
class EncodedTexts:
    ids: list[list[int]]
    labels: list[int] | None
    truncated: int  # how many texts were cut to max_length


TEXT_FIELD = "{text}"


def apply_template(template: str | None, texts: list[str]) -> list[str]:
    """Each text put where `{text}` stands in `template` (None: the texts unchanged)."""
    if template is None:
        return texts
    return [template.replace(TEXT_FIELD, text) for text in texts]


LABELS_FIELD = "{labels}"
AUTO_TEMPLATE = "auto"
# What `--template auto` asks, inside the backbone's chat format when it has one.
DEFAULT_INSTRUCTION = "Classify the following text as one of: {labels}.\n\n{text}"


def template_problem(template: str | None) -> str | None:
    """What is wrong with a template (None if nothing is). `{text}` and `{labels}` are its only
    placeholders: another `{name}` is refused as a likely typo (`{label}`, `{Text}`), while braces
    around anything else (JSON, an unbalanced `{`) are kept as written."""
    if template is None or template == AUTO_TEMPLATE:
        return None
    if TEXT_FIELD not in template:
        return f"template must contain {TEXT_FIELD} where the text goes (or be {AUTO_TEMPLATE!r}), got {template!r}"
    unknown = sorted(set(re.findall(r"\{(\w+)\}", template)) - {TEXT_FIELD[1:-1], LABELS_FIELD[1:-1]})
    if unknown:
        return (f"template has the unknown placeholder(s) {', '.join('{' + name + '}' for name in unknown)}: "
                f"only {TEXT_FIELD} (the text) and {LABELS_FIELD} (the class names) are filled in; got {template!r}")
    return None


def resolve_template(template: str | None, chat_template: str | None, labels: list[str]) -> str | None:
    """The template a model reads: `auto` is `DEFAULT_INSTRUCTION` inside `chat_template` (one user
    turn with "{prompt}"; None: the bare instruction); `{labels}` becomes the class names."""
    if template == AUTO_TEMPLATE:
        template = DEFAULT_INSTRUCTION if chat_template is None else chat_template.replace("{prompt}",
                                                                                            DEFAULT_INSTRUCTION)
    if template is None:
        return None
    if LABELS_FIELD in template and any(TEXT_FIELD in label for label in labels):
        raise DataError(f"the label {next(x for x in labels if TEXT_FIELD in x)!r} holds {TEXT_FIELD}, which the "
                        f"template's {LABELS_FIELD} would turn into a second place for the text; rename it "
                        "(--label-names) or use a template without {labels}")
    return template.replace(LABELS_FIELD, ", ".join(labels))


def encode_texts(texts: list[str], tokenizer, max_length: int, label_ids: list[int] | None = None,
                 token_ids: list[list[int]] | None = None, keep_last: int = 0) -> EncodedTexts:
    """Token ids cut to `max_length` (pass `token_ids` when the texts are already tokenised). A text
    that is too long loses tokens before its last `keep_last` (a template's end, e.g. the chat
    format's assistant turn that the last-token pooling reads), not those."""
    encoded = token_ids if token_ids is not None else tokenizer.encode_batch(texts)
    truncated = sum(len(ids) > max_length for ids in encoded)
    keep_last = min(keep_last, max_length // 2)
    encoded = [(ids if len(ids) <= max_length else ids[:max_length - keep_last] + ids[len(ids) - keep_last:])
               or [tokenizer.pad_id] for ids in encoded]
    return EncodedTexts(encoded, label_ids, truncated)


def template_suffix_tokens(template: str | None, tokenizer) -> int:
    """How many tokens a template puts after the text (kept when long texts are cut)."""
    if template is None or template.endswith(TEXT_FIELD):
        return 0
    suffix = template.split(TEXT_FIELD)[-1]
    return len(tokenizer.encode(suffix)) - (tokenizer.bos_id is not None)


def template_prefix_tokens(template: str | None, tokenizer) -> int:
    """How many tokens a template puts before the text (with the tokenizer's BOS): those its filled-in
    forms share whatever the text (tokens can merge across the text's edge, so they are counted on two
    filled-in forms, not on the template's piece alone)."""
    if template is None:
        return 0
    a, b = (tokenizer.encode(template.replace(TEXT_FIELD, text)) for text in ("0", "1"))
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)) - 1)


def collate(ids: list[list[int]], pad_id: int, fixed_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence (or to `fixed_length`); returns (input_ids, attention_mask)."""
    length = fixed_length or max(len(x) for x in ids)
    input_ids = torch.full((len(ids), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), length), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    return input_ids, attention_mask


# Inference batches: padding may add at most this share of the real tokens before a new batch starts.
PADDING_SLACK = 0.25


def inference_batches(lengths: list[int], batch_size: int, slack: float = PADDING_SLACK) -> list[list[int]]:
    """Text indices per forward pass for inference: sorted by length, at most `batch_size` per batch,
    and a new batch wherever padding to the next (longer) text would exceed `slack` x the real tokens.

    Sorting alone leaves little padding in a large input (`predict` on a file); a server's batch is the
    few texts that arrived together, whose lengths vary widely, and padding them all to the longest
    wasted about half of its compute: there, splitting by length is the cheaper pass."""
    batches: list[list[int]] = []
    batch: list[int] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lambda j: lengths[j]):
        if batch and (len(batch) == batch_size or (len(batch) + 1) * lengths[i] > (1 + slack) * (real + lengths[i])):
            batches.append(batch)
            batch, real = [], 0
        batch.append(i)
        real += lengths[i]
    return batches + [batch] if batch else batches


def batch_order(lengths: list[int], batch_size: int, shuffle: bool, bucket: bool,
                rng: random.Random) -> list[list[int]]:
    """Indices grouped into batches. With `bucket`, texts of similar length share a batch (less
    padding): shuffled indices are sorted by length within windows of 50 batches, and the
    batches themselves are shuffled."""
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    if bucket:
        window = batch_size * 50
        order = [i for start in range(0, len(order), window)
                 for i in sorted(order[start:start + window], key=lambda j: lengths[j])]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if bucket and shuffle:
        rng.shuffle(batches)
    return batches


# --- a real multi-label set ---------------------------------------------------------------------

AG_NEWS_CLASSES = {"1": "World", "2": "Sports", "3": "Business", "4": "Sci/Tech"}


def ag_news_multilabel(csv_path: str | os.PathLike, n: int = 1400, pair_share: float = 0.4,
                       seed: int = 123) -> LabelledTexts:
    """A multi-label set derived from AG News (`../shared/data/ag_news/test.csv`: class, title,
    description; no header): `n` texts, each one news title labelled with its topic, or (a `pair_share` of
    them) two titles of different topics joined by " / " and labelled with both. Every article is used
    once; the labels are joined by ","."""
    from llmclf.multilabel import DEFAULT_SEP, join_labels

    with open(csv_path, encoding="utf-8", newline="") as f:
        rows = [(AG_NEWS_CLASSES[r[0]], " ".join(r[1].split())) for r in csv.reader(f) if len(r) == 3]
    if len(rows) < 2 * n:
        raise DataError(f"{csv_path}: {len(rows)} articles, fewer than the {2 * n} a set of {n} texts may need")
    rng = np.random.default_rng(seed)
    articles = [rows[i] for i in rng.permutation(len(rows))]
    texts, labels, used = [], [], 0
    n_pairs = round(n * pair_share)
    for i in range(n):
        first = articles[used]
        used += 1
        if i < n_pairs:  # the next article of another topic
            j = next(k for k in range(used, len(articles)) if articles[k][0] != first[0])
            second = articles.pop(j)
            texts.append(f"{first[1]} / {second[1]}")
            labels.append(join_labels([first[0], second[0]], DEFAULT_SEP))
        else:
            texts.append(first[1])
            labels.append(first[0])
    order = rng.permutation(n)
    return LabelledTexts([texts[i] for i in order], [labels[i] for i in order], f"{csv_path} (multi-label)",
                         DEFAULT_SEP)
