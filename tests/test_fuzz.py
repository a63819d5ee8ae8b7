"""Fuzzing with hypothesis: the labelled-data and predict readers, `data split`, templates,
`--label-names` and the tokenizer wrappers. Each property's docstring says what must hold; each
`@example` is an input that once broke it (the bug is named beside it).

Profiles: `fuzz` (the default suite: 60 examples per property, no deadline) and `fuzz-slow`
(2,000 examples). `LLMCLF_FUZZ_PROFILE=fuzz-slow pytest tests/test_fuzz.py --hypothesis-show-statistics`
runs the large one; so does `pytest -m slow tests/test_fuzz.py`, whose
`test_every_property_with_the_slow_profile` reruns this file under it (and the tokenizers of the
packaged SmolLM2 and Gemma 3 GGUF files, slow-only: real model files, 2 and 5 s to build).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from llmclf.cli import app
from llmclf.data.classification import (
    LabelledTexts,
    apply_template,
    parse_label_names,
    read_labelled,
    resolve_template,
    split_labelled,
    template_problem,
)
from llmclf.errors import ConfigError, DataError, LlmclfError
from llmclf.predict import iter_rows, predict_file
from llmclf.tokenizer import ENDOFTEXT, GPT2Tokenizer, HFTokenizer
from llmclf.training.args import TrainArgs
from tiny_classifier import tiny_classifier_dir

settings.register_profile("fuzz", max_examples=60, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("fuzz-slow", parent=settings.get_profile("fuzz"), max_examples=2000)
FUZZ = settings(settings.get_profile(os.environ.get("LLMCLF_FUZZ_PROFILE", "fuzz")))
runner = CliRunner()

# --- strategies ---------------------------------------------------------------------------------

# Pieces that break naive readers and renderers, mixed with arbitrary Unicode (no surrogates:
# those are not text a UTF-8 file can hold; the JSON and tokenizer properties add them).
AWKWARD = ['"', "'", ",", "\t", "\r", "\n", "\r\n", "\x00", "\ufeff", "\u2028", "\x85", "\x0b", "\x1e", " ", "  ",
           "{", "}", "{text}", "{labels}", "{{text}}", "\\", "#", "=", "nan", "None", "NULL", ENDOFTEXT,
           "<|im_end|>", "<end_of_turn>", "😀", "é", "\u0301", "\u200b", "\u2581", "\x04", "\U00080000"]
pieces = st.one_of(st.text(max_size=6), st.sampled_from(AWKWARD))
texts = st.lists(pieces, max_size=8).map("".join)
solid = texts.map(lambda s: s if s.strip() else s + "x")  # not blank: a text the readers must keep


def mostly(common: st.SearchStrategy, rare: st.SearchStrategy, one_in: int = 5) -> st.SearchStrategy:
    """`common`, but one time in about `one_in` `rare` (st.one_of would draw each half the time)."""
    return st.sampled_from([False] * (one_in - 1) + [True]).flatmap(lambda pick_rare: rare if pick_rare else common)


mostly_solid = mostly(solid, texts)
line_ends = st.sampled_from(["\n", "\r\n", "\r"])


def has_surrogate(value) -> bool:
    return isinstance(value, str) and re.search("[\ud800-\udfff]", value) is not None


@st.composite
def rows_of(draw, columns: list, max_rows: int = 8, min_rows: int = 0) -> list[list[str]]:
    """Rows of values drawn from `columns` (a strategy per column); in a quarter of the files one
    text is enormous (beyond the csv module's default 128 KiB field limit)."""
    rows = draw(st.lists(st.tuples(*columns).map(list), min_size=min_rows, max_size=max_rows))
    if rows and draw(st.integers(0, 3)) == 0:
        row, column = draw(st.integers(0, len(rows) - 1)), 0
        cell = rows[row][column] + "x"
        rows[row][column] = cell * (140_000 // len(cell) + 1)
    return rows


def serialise_csv(rows: list[list[str]], sep: str, quoting: int, ends: list[str], blank_after: list[bool],
                  bom: bool, final_end: bool) -> bytes:
    """`rows` as the csv module writes them, each row with its own line end (mixing LF, CRLF and
    CR) and optional blank lines. Rows are written with CRLF ends, so that the writer quotes every
    field holding a CR or LF, and then given their end."""
    out = ["\ufeff"] if bom else []
    for i, row in enumerate(rows):
        buf = io.StringIO()
        csv.writer(buf, delimiter=sep, quoting=quoting, lineterminator="\r\n").writerow(row)
        end = ends[i % len(ends)]
        last = i == len(rows) - 1
        out.append(buf.getvalue()[:-2] + (end if not last or final_end else ""))
        if blank_after[i % len(blank_after)] and not last:
            out.append(end)  # a blank line: the same end again (CR then LF would be one CRLF end)
    return "".join(out).encode("utf-8")


@st.composite
def csv_files(draw, columns: list[str], values: list, min_rows: int = 0,
              max_rows: int = 8) -> tuple[str, list[list[str]], bytes]:
    """(suffix, data rows, file bytes) of a CSV or TSV file with a header `columns`."""
    suffix = draw(st.sampled_from([".csv", ".tsv"]))
    rows = draw(rows_of(values, min_rows=min_rows, max_rows=max_rows))
    data = serialise_csv([columns, *rows], "\t" if suffix == ".tsv" else ",",
                         draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC])),
                         draw(st.lists(line_ends, min_size=1, max_size=4)),
                         draw(st.lists(st.booleans(), min_size=1, max_size=4)), draw(st.booleans()),
                         draw(st.booleans()))
    return suffix, rows, data


@st.composite
def jsonl_files(draw, columns: list[str], values) -> tuple[str, list[dict], bytes]:
    """(suffix, records, file bytes) of a JSON-lines file (LF or CRLF ends, blank lines, BOM)."""
    records = draw(st.lists(st.fixed_dictionaries({c: values for c in columns}), max_size=8))
    end = draw(st.sampled_from(["\n", "\r\n"]))
    ascii_only = draw(st.booleans()) or any(has_surrogate(v) for r in records for v in r.values())
    lines = [json.dumps(r, ensure_ascii=ascii_only) + end + (end if draw(st.booleans()) else "") for r in records]
    data = ("\ufeff" if draw(st.booleans()) else "") + "".join(lines)
    return draw(st.sampled_from([".jsonl", ".ndjson"])), records, data.encode("utf-8")


def write(directory: str, suffix: str, data: bytes) -> Path:
    path = Path(directory) / f"data{suffix}"
    path.write_bytes(data)
    return path


# Arbitrary bytes, biased to the structure of the formats.
BYTE_PIECES = [b"text,label\n", b"text\tlabel\n", b'{"text": "a", "label": "b"}\n', b'{"text": ', b'"label": ',
               b",", b"\t", b'"', b'""', b"\n", b"\r", b"\r\n", b"\x00", b"\xef\xbb\xbf", b"\xff\xfe", b"\xc3",
               b"\xed\xa0\x80", b"a", b"null", b"[1]", b"{}", b"NaN", b'"\\ud800"', b" "]
hostile_bytes = st.lists(st.one_of(st.binary(max_size=6), st.sampled_from(BYTE_PIECES)), max_size=24).map(b"".join)
any_suffix = st.sampled_from([".csv", ".tsv", ".tab", ".jsonl", ".ndjson", ".json", ".txt", ""])


@st.composite
def mutated_files(draw) -> tuple[str, bytes]:
    """A valid labelled CSV/TSV/JSONL file with up to three pieces of bytes inserted, deleted or
    overwritten, sometimes under another suffix: files that are nearly right."""
    suffix, _, data = draw(st.one_of(csv_files(["text", "label"], [solid, solid], min_rows=1),
                                     jsonl_files(["text", "label"], solid)))
    data = bytearray(data)
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(data)))
        piece = draw(st.one_of(st.sampled_from(BYTE_PIECES), st.binary(max_size=3)))
        match draw(st.sampled_from(["insert", "delete", "overwrite"])):
            case "insert":
                data[at:at] = piece
            case "delete":
                del data[at:at + len(piece)]
            case "overwrite":
                data[at:at + len(piece)] = piece
    return draw(st.sampled_from([suffix, suffix, suffix, ".csv", ".jsonl", ".tsv"])), bytes(data)


# --- readers ------------------------------------------------------------------------------------

@FUZZ
@given(file=st.one_of(st.tuples(any_suffix, hostile_bytes), mutated_files()))
@example(file=(".jsonl", b'{"text": null, "label": "b"}\n'))  # AttributeError on a JSON null text
@example(file=(".jsonl", b'{"text": "a", "label": "b"}\n{"label": "c"}\n'))  # AttributeError: key missing
@example(file=(".csv", b""))  # predict: pandas' EmptyDataError escaped
@example(file=(".txt", b"\xff\n"))  # predict: UnicodeDecodeError escaped
@example(file=(".jsonl", b"\xff\n"))  # predict: UnicodeDecodeError escaped
@example(file=(".csv", b'text,label\n"a\n'))  # predict: pandas' ParserError escaped
def test_any_bytes_are_read_or_refused_with_a_data_error_naming_the_file(file):
    """For any bytes in any of the accepted formats, `read_labelled` returns as many texts as labels,
    no text blank and every label stripped and non-empty, and predict's reader returns strings;
    or either raises an LlmclfError whose message names the file. Never another exception."""
    suffix, data = file
    with tempfile.TemporaryDirectory() as tmp:
        path = write(tmp, suffix, data)
        try:
            got = read_labelled(path)
        except LlmclfError as exc:
            assert str(path) in str(exc)
            event(f"read_labelled: {type(exc).__name__}")
        else:
            event("read_labelled: rows")
            assert len(got.texts) == len(got.labels) > 0
            assert all(t.strip() for t in got.texts)
            assert all(label and label == label.strip() for label in got.labels)
        try:
            rows = list(iter_rows(path, "text"))
        except LlmclfError as exc:
            assert str(path) in str(exc)
            event(f"iter_rows: {type(exc).__name__}")
        else:
            event("iter_rows: rows")
            assert all(isinstance(text, str) for text in rows)


@FUZZ
@given(file=csv_files(["text", "label"], [mostly_solid, mostly_solid]))
@example(file=(".csv", [["a", "x", "extra"]], b"text,label\na,x,extra\n"))  # pandas took column 1 as an index
@example(file=(".csv", [["None", "nan"]], b"text,label\nNone,nan\n"))  # labels "nan"/"None" were "missing"
def test_labelled_csv_round_trips_or_names_the_bad_row(file):
    """A CSV/TSV the csv module wrote (any quoting, LF/CRLF/CR line ends mixed, blank lines, a BOM,
    NUL, quotes, enormous fields) is read back exactly: rows read = rows written (blank lines are
    no rows), texts as written, labels stripped. The one documented refusal: a blank text or label
    raises DataError naming its spreadsheet row (header = row 1); a row whose field count differs
    from the header's (only in the hand-written examples) names its row too."""
    suffix, rows, data = file
    with tempfile.TemporaryDirectory() as tmp:
        path = write(tmp, suffix, data)
        bad = next((i for i, row in enumerate(rows) if len(row) != 2 or not row[0].strip() or not row[1].strip()),
                   None)
        if not rows:
            with pytest.raises(DataError, match="has no rows"):
                read_labelled(path)
        elif bad is None:
            event("read back")
            got = read_labelled(path)
            assert got.texts == [row[0] for row in rows]
            assert got.labels == [row[1].strip() for row in rows]
        else:
            event("refused: a blank text or label")
            with pytest.raises(DataError, match=rf"{re.escape(str(path))}, row {bad + 2}[ :]"):
                read_labelled(path)


json_values = mostly(solid, st.one_of(texts, st.integers(), st.none(), st.sampled_from(["\ud800", "a\udfffb"])), 20)


@FUZZ
@given(file=jsonl_files(["text", "label"], json_values), extra=mostly(st.just(False), st.just(True), 4),
       as_array=st.booleans())
@example(file=(".jsonl", [{"text": "\ud800", "label": "x"}],  # pandas dropped the lone surrogate
               b'{"text": "\\ud800", "label": "x"}\n'), extra=False, as_array=False)
@example(file=(".jsonl", [{"text": "a", "label": "x"}], b'\xef\xbb\xbf{"text": "a", "label": "x"}\n'),
         extra=False, as_array=False)  # a BOM: "Expected object or value"
def test_labelled_json_round_trips_or_names_the_bad_line(file, extra, as_array):
    """A JSON-lines file (LF/CRLF, blank lines, a BOM, ASCII-escaped or raw Unicode) or a `.json`
    array of the same objects is read back exactly: one row per object, strings as written, numbers
    as their str(), labels stripped. A null, blank or surrogate-holding value raises DataError
    naming its line (counting blank lines) or record; so does a line or element that is not an
    object (`extra` adds one at the end)."""
    suffix, records, data = file
    if as_array:
        suffix, data = ".json", json.dumps(records + [[1, 2]] * extra).encode("utf-8")
        place = [f"record {i}" for i in range(1, len(records) + 2)]
    else:
        data += b"[1, 2]\n" * extra
        lines = data.decode("utf-8").removeprefix("\ufeff").split("\n")
        place = [f"line {n}" for n, line in enumerate(lines, 1) if line.strip()]

    def bad(value) -> bool:
        return value is None or not str(value).strip() or has_surrogate(value)

    with tempfile.TemporaryDirectory() as tmp:
        path = write(tmp, suffix, data)
        first_bad = next((i for i, r in enumerate(records) if bad(r["text"]) or bad(r["label"])), None)
        if first_bad is None and not extra and records:
            event("read back")
            got = read_labelled(path)
            assert got.texts == [str(r["text"]) for r in records]
            assert got.labels == [str(r["label"]).strip() for r in records]
        elif first_bad is None and not records and not extra:
            with pytest.raises(DataError, match="has no rows"):
                read_labelled(path)
        else:
            event("refused")
            where = place[first_bad if first_bad is not None else len(records)]
            with pytest.raises(DataError, match=rf"{re.escape(str(path))}, {where}: "):
                read_labelled(path)


@st.composite
def predict_inputs(draw, values) -> tuple[str, bytes, list[str]]:
    """(suffix, bytes, texts a reader must give back) of a predict input holding the texts `values`
    draws: CSV/TSV/JSONL (an id column before the text) or plain text, one per line."""
    fmt, texts_in = draw(st.sampled_from([".csv", ".tsv", ".jsonl", ".txt"])), draw(values)
    if fmt == ".txt":
        lines = [t.replace("\r", " ").replace("\n", " ") for t in texts_in]
        bom, ends = draw(st.booleans()), draw(st.lists(line_ends, min_size=1, max_size=3))
        body, previous = "", ""
        for i, line in enumerate(lines):
            # CR, then an empty line's LF, would be one CRLF end: that empty line ends in CR too
            previous = "\r" if previous == "\r" and not line else ends[i % len(ends)]
            body += line + previous
        expected = list(lines)
        if lines and not bom:
            expected[0] = expected[0].removeprefix("\ufeff")  # a leading U+FEFF is the BOM, dropped
        return fmt, (("\ufeff" if bom else "") + body).encode("utf-8"), expected
    if fmt == ".jsonl":
        lines = [json.dumps({"id": i, "text": t}, ensure_ascii=draw(st.booleans())) + "\n"
                 for i, t in enumerate(texts_in)]
        return fmt, "".join(lines).encode("utf-8"), list(texts_in)
    rows = [["id", "text"]] + [[str(i), t] for i, t in enumerate(texts_in)]
    return fmt, serialise_csv(rows, "\t" if fmt == ".tsv" else ",", csv.QUOTE_MINIMAL,
                              draw(st.lists(line_ends, min_size=1, max_size=3)), [False], draw(st.booleans()),
                              True), list(texts_in)


@FUZZ
@given(file=predict_inputs(rows_of([texts], 10).map(lambda rows: [row[0] for row in rows])))
@example(file=(".csv", b"", []))  # pandas' EmptyDataError escaped as a ValueError
@example(file=(".txt", b"\xef\xbb\xbfa\n", ["a"]))  # the BOM was read as part of the first text
def test_predict_reads_every_row_of_its_input_in_order(file):
    """Predict's reader gives back every text of its input in order, empty ones too (rows read =
    rows written: blank lines of a .txt are empty texts, of a CSV no rows); the documented
    normalisation: a .txt text loses its line breaks (they end it) and a leading U+FEFF of the
    first line, which is indistinguishable from a BOM. An empty CSV (no header) is a DataError."""
    fmt, raw, expected = file
    with tempfile.TemporaryDirectory() as tmp:
        path = write(tmp, fmt, raw)
        if fmt == ".csv" and not raw:
            with pytest.raises(DataError, match="is empty"):
                list(iter_rows(path, "text"))
            return
        assert list(iter_rows(path, "text")) == expected


@pytest.fixture(scope="module")
def tiny_clf(tmp_path_factory, shared_dir):
    from llmclf.classifier import load_classifier

    return load_classifier(tiny_classifier_dir(tmp_path_factory, shared_dir), precision="float32")


def read_output(path: Path) -> list[tuple[str, list[float]]]:
    """(text, probabilities) per row of a predict output file."""
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8", newline="\n") as f:
            return [(r["text"], list(r["probabilities"].values())) for r in map(json.loads, f)]
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
    return [(row[0], [float(p) for p in row[2:]]) for row in rows[1:]]


@settings(FUZZ, max_examples=max(10, FUZZ.max_examples // 2))
@given(file=predict_inputs(st.lists(texts, min_size=1, max_size=8)),
       out_fmt=st.sampled_from([".csv", ".tsv", ".jsonl"]), chunk_size=st.integers(1, 5), batch_size=st.integers(1, 4))
@example(file=(".csv", b'id,text\r\n0,"a\rb"\r\n1,c\r\n', ["a\rb", "c"]), out_fmt=".csv", chunk_size=1,
         batch_size=1)  # the output's lone CR was written unquoted: row 0 split in two
def test_predict_output_row_i_is_input_row_i(tiny_clf, file, out_fmt, chunk_size, batch_size):
    """`predict_file` writes one output row per input row, in input order: output row i holds input
    text i and the probabilities the classifier gives that text alone (whatever chunk and batch it
    shared), and the output file reads back with the csv/json modules (texts with CR, quotes, tabs
    and NUL included)."""
    fmt, raw, expected = file
    with tempfile.TemporaryDirectory() as tmp:
        src, out = write(tmp, fmt, raw), Path(tmp) / f"out{out_fmt}"
        stats = predict_file(tiny_clf, src, out, chunk_size=chunk_size, batch_size=batch_size, progress=False)
        got = read_output(out)
    assert stats["rows"] == len(got) == len(expected)
    assert [text for text, _ in got] == expected
    alone = tiny_clf.predict_proba(expected[::-1], batch_size=1)[::-1]  # each text alone, in reverse order
    np.testing.assert_allclose([p for _, p in got], alone, atol=1e-5)


# --- data split ---------------------------------------------------------------------------------

shares = st.one_of(
    st.tuples(*[st.integers(0, 10)] * 3).map(lambda w: tuple(x / sum(w) for x in w) if sum(w) else (1.0, 0.0, 0.0)),
    st.tuples(*[st.floats(allow_nan=True, allow_infinity=True)] * 3))


@FUZZ
@given(labels=st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=60), ratios=shares,
       stratify=st.booleans(), seed=st.integers(0, 2**32 - 1))
@example(labels=["a"] * 10, ratios=(0.5, float("nan"), 0.5), stratify=False, seed=0)  # ValueError from round(nan)
def test_split_partitions_stratifies_and_repeats(labels, ratios, stratify, seed):
    """`split_labelled` either raises DataError or returns train/validation/test that partition the
    rows (each row in exactly one part: none lost or duplicated) with round(n * share) rows in
    validation and test; with `stratify`, each label's count in a part is within 1 of its share of
    the rows the part was drawn from (test from all, validation from the rest); the same seed gives
    the same parts."""
    data = LabelledTexts([f"t{i}" for i in range(len(labels))], labels, "fuzz")
    try:
        parts = split_labelled(data, ratios, stratify, seed)
    except DataError as exc:
        event("refused: " + re.sub(r"[-\d.e]+|nan|inf", "N", str(exc).split(" for the split")[0])[:50])
        return
    event("split")
    ids = [int(t[1:]) for part in parts for t in part.texts]
    assert sorted(ids) == list(range(len(labels)))
    assert all(part.labels == [labels[int(t[1:])] for t in part.texts] for part in parts)
    n = len(labels)
    assert (len(parts[1]), len(parts[2])) == (round(n * ratios[1]), round(n * ratios[2]))
    if stratify:
        rest = parts[0].labels + parts[1].labels
        for part, parent in ((parts[2], labels), (parts[1], rest)):
            for label in set(parent):
                assert abs(part.labels.count(label) - len(part) * parent.count(label) / len(parent)) < 1 + 1e-9
    again = split_labelled(data, ratios, stratify, seed)
    assert [p.texts for p in again] == [p.texts for p in parts]


label_name = st.one_of(solid.filter(lambda s: "," not in s), st.sampled_from(["None", "nan", " x ", "a=b"]))


@settings(FUZZ, max_examples=max(10, FUZZ.max_examples // 2))
@given(file=csv_files(["text", "label"], [mostly_solid, mostly(st.sampled_from(["0", " 1", "2"]), texts, 10)],
                      min_rows=6, max_rows=12),
       ratios=mostly(st.sampled_from(["0.7,0.1,0.2", "0.8,0.2,0", "0.5,0,0.5", "1,0,0"]), st.text(max_size=12), 4),
       stratify=st.booleans(), seed=st.integers(0, 99),
       names=st.lists(label_name, min_size=3, max_size=3).map(  # distinct, as a rename must be
           lambda ns: [n if [m.strip() for m in ns].count(n.strip()) == 1 else f"{n.strip()}#{i}"
                       for i, n in enumerate(ns)]),
       rename=st.booleans(), stale=st.booleans())
@example(file=(".csv", [["a", "0"], ["b", "1"]], b"text,label\na,0\nb,1\n"), ratios="1,0,0", stratify=False,
         seed=0, names=["None", "nan", "x"], rename=True, stale=True)  # "None"/"nan" read back as missing labels
@example(file=(".csv", [["a\rb", "0"]], b'text,label\r\n"a\rb",0\r\n'), ratios="1,0,0", stratify=False, seed=0,
         names=["x", "y", "z"], rename=False, stale=False)  # the lone CR was written unquoted: rows split
def test_cli_split_files_partition_the_input(file, ratios, stratify, seed, names, rename, stale):
    """`llmclf data split` (any --ratios string, optional --label-names) exits 0, 1 (an LlmclfError)
    or 2 (a bad option), never with another exception. On success the files in --out hold every
    input row exactly once (an earlier split's file for a part of share 0 is gone, not left to leak
    rows), each read back with the input's texts and the renamed labels; the same seed writes the
    same bytes."""
    suffix, rows, data = file
    mapping = {str(i): name for i, name in enumerate(names)}
    with tempfile.TemporaryDirectory() as tmp:
        src, out = write(tmp, suffix, data), Path(tmp) / "out"
        if stale:
            out.mkdir()
            for name in ("train", "validation", "test"):
                (out / f"{name}.csv").write_text("text,label\nstale,0\n")
        args = ["data", "split", str(src), "--out", str(out), f"--ratios={ratios}", "--seed", str(seed)]
        args += ["--stratify"] * stratify
        args += [f"--label-names={','.join(f'{k}={v}' for k, v in mapping.items())}"] * rename
        result = runner.invoke(app, args)
        problem = re.sub(r"\d+", "N", str(result.exception).replace(str(src), "FILE"))[:50]
        event(f"exit {result.exit_code}" + (f": {problem}" if result.exit_code == 1 else ""))
        if result.exit_code != 0:
            assert result.exit_code == 2 or isinstance(result.exception, LlmclfError), result.exception
            return
        files = sorted(out.glob("*.csv"))
        written = [pair for f in files for pair in zip(read_labelled(f).texts, read_labelled(f).labels, strict=True)]
        renamed = parse_label_names(args[-1].removeprefix("--label-names=")) if rename else {}
        expected = [(text, renamed.get(label.strip(), label.strip())) for text, label in rows]
        assert sorted(written) == sorted(expected)
        before = {f.name: f.read_bytes() for f in files}
        assert runner.invoke(app, args).exit_code == 0
        assert {f.name: f.read_bytes() for f in sorted(out.glob("*.csv"))} == before


# --- templates ----------------------------------------------------------------------------------

literal = texts.filter(lambda s: not re.search(r"\{\w+\}", s))  # no `{name}` placeholder: kept as written
class_names = st.lists(solid, min_size=2, max_size=4, unique=True)


@FUZZ
@given(before=literal, after=literal, labels_at=st.sampled_from([None, "before", "after"]), labels=class_names,
       text=texts)
@example(before="Label: ", after="", labels_at="before", labels=["{text}", "b"], text="X")  # text put in a label
def test_any_text_renders_into_a_valid_template(before, after, labels_at, labels, text):
    """A template of literal text (any braces that do not form `{name}`, NUL, newlines) around one
    `{text}`, with or without `{labels}`, is accepted, and any text (braces, `{text}` itself,
    newlines, NUL) renders to exactly the template with the text in its place and the class names
    in theirs. A class name holding `{text}` under a `{labels}` template is a DataError naming it."""
    before += "{labels}" if labels_at == "before" else ""
    after += "{labels}" if labels_at == "after" else ""
    template = before + "{text}" + after
    assert template_problem(template) is None
    TrainArgs.for_engine("scratch", template=template)  # no ConfigError
    if labels_at and any("{text}" in name for name in labels):
        with pytest.raises(DataError, match="holds {text}"):
            resolve_template(template, None, labels)
        return
    resolved = resolve_template(template, None, labels)
    [rendered] = apply_template(resolved, [text])
    joined = ", ".join(labels)
    assert rendered == before.replace("{labels}", joined) + text + after.replace("{labels}", joined)


identifiers = st.from_regex(r"\A\w{1,8}\Z").filter(lambda s: s not in ("text", "labels"))


@FUZZ
@given(template=st.one_of(literal, texts), name=identifiers, at=st.integers(0, 100))
@example(template="Review: {text}", name="label", at=8)  # a typo for {labels} was kept as literal text
def test_malformed_templates_are_refused_with_the_reason(template, name, at):
    """A template without `{text}` is refused, and so is one with a `{name}` placeholder other than
    `{text}` and `{labels}` (a likely typo such as `{label}`): `template_problem` names the problem
    and the training options raise ConfigError with it. Any string gets an answer, never a crash."""
    problem = template_problem(template)
    assert problem is None or isinstance(problem, str)
    if "{text}" not in template:
        assert problem and "must contain {text}" in problem
        with pytest.raises(ConfigError, match="--template"):
            TrainArgs.for_engine("scratch", template=template)
    typo = template[:at] + "{" + name + "}" + template[at:] + "{text}"
    problem = template_problem(typo)
    assert problem and "{" + name + "}" in problem
    with pytest.raises(ConfigError, match=re.escape("{" + name + "}")):
        TrainArgs.for_engine("scratch", template=typo)


# --- --label-names ------------------------------------------------------------------------------

@FUZZ
@given(spec=st.one_of(
    st.text(),
    st.lists(st.tuples(texts, texts), max_size=4).map(lambda pairs: ",".join(f"{a}={b}" for a, b in pairs)),
    st.lists(st.tuples(label_name.filter(lambda s: "=" not in s), label_name), min_size=1, max_size=4).map(
        lambda pairs: ",".join(f"{a}={b}" for a, b in pairs))))
@example(spec="0=a,1=a")  # two labels merged into one silently
def test_any_label_names_spec_parses_to_distinct_names_or_is_refused(spec):
    """Any string is either OLD=NEW pairs, parsed into a mapping with distinct, non-empty, stripped
    OLD and NEW names (no comma in either, no `=` in OLD) that formats back to itself, or a
    DataError quoting the spec. No two labels are ever merged."""
    try:
        names = parse_label_names(spec)
    except DataError as exc:
        assert repr(spec) in str(exc)
        event("refused")
        return
    event(f"{len(names)} name(s)")
    assert names and len(set(names.values())) == len(names)
    for old, new in names.items():
        assert old and new and old == old.strip() and new == new.strip()
        assert "," not in old + new and "=" not in old
    assert parse_label_names(",".join(f"{old}={new}" for old, new in names.items())) == names


# --- tokenizers ---------------------------------------------------------------------------------

# Lone surrogates are not Unicode, but a Python str (e.g. from JSON "\ud800") can hold them.
SURROGATES = ["\ud800", "\udfff", "a\udc80", "\ud83d\ude00"]
any_strings = st.one_of(texts, st.lists(st.one_of(pieces, st.sampled_from(SURROGATES)), max_size=8).map("".join),
                        st.text(alphabet=st.characters(exclude_categories=()), max_size=20))


def without_surrogates(text: str) -> str:
    """What a tokenizer encodes: a lone surrogate as U+FFFD, a split pair joined (tiktoken's rule)."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


@pytest.fixture(scope="module")
def hf_byte_level(gpt2_tokenizer_dir) -> HFTokenizer:
    """GPT-2's vocabulary and merges as a Hugging Face `tokenizers` byte-level BPE with the ChatML
    special tokens (what the SmolLM2 and Qwen tokenizers are), for the HFTokenizer wrapper."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    backend = Tokenizer(models.BPE.from_file(str(gpt2_tokenizer_dir / "encoder.json"),
                                             str(gpt2_tokenizer_dir / "vocab.bpe")))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([ENDOFTEXT, "<|im_start|>", "<|im_end|>"])
    return HFTokenizer(backend, eos_id=backend.token_to_id(ENDOFTEXT), pad_id=None, source="gpt2 files")


def check_tokenizer(tok: GPT2Tokenizer | HFTokenizer, text: str, lossless: bool = True) -> None:
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.encode_batch([text, "x" + text]) == [ids, tok.encode("x" + text)]
    body = ids[1:] if tok.bos_id is not None else ids
    assert tok.bos_id is None or ids[0] == tok.bos_id
    if lossless:
        assert tok.decode(body) == without_surrogates(text)


@FUZZ
@given(text=any_strings)
@example(text="a\ud800b")  # HFTokenizer: TypeError from `tokenizers` on a lone surrogate
@example(text="\x00" * 3 + ENDOFTEXT + "{text}")
@example(text="ab " * 20_000 + "a" * 100_000)  # 160,000 characters
def test_every_tokenizer_encodes_any_string_and_decodes_it_back(tokenizer, hf_byte_level, text):
    """GPT-2 (tiktoken) and HFTokenizer (byte-level BPE) encode any str, one alone or in a batch
    alike, into ids below the vocabulary size, and decode them back to the very string: both are
    lossless, except that a lone surrogate (no Unicode) becomes U+FFFD as in tiktoken."""
    check_tokenizer(tokenizer, text)
    check_tokenizer(hf_byte_level, text)


@FUZZ
@given(before=texts, after=texts)
def test_special_token_strings_in_user_text(tokenizer, hf_byte_level, before, after):
    """What a special token's string inside a user's text becomes (stated behaviour, not a fix):
    GPT-2 reads `<|endoftext|>` as the end-of-text token 50256, by design (allowed in text, for
    language-model corpora that join documents with it); HFTokenizer reads every special token its
    tokenizer.json registers (`<|im_end|>`, Gemma's `<end_of_turn>`, ...) as that token, as
    `transformers` does by default. Text without such strings never yields a special id."""
    if ENDOFTEXT not in before + after:
        assert tokenizer.eos_id not in tokenizer.encode(before + after)
    assert tokenizer.encode(before + ENDOFTEXT + after).count(tokenizer.eos_id) == \
        (before + ENDOFTEXT + after).count(ENDOFTEXT)
    special = {hf_byte_level.backend.token_to_id(t): t for t in (ENDOFTEXT, "<|im_start|>", "<|im_end|>")}
    text = before + "<|im_end|>" + after
    ids = hf_byte_level.encode(text)
    assert sum(ids.count(i) for i in special) == sum(text.count(t) for t in special.values())


def byte_level_alphabet() -> list[str]:
    """The character GPT-2's byte-level BPE writes for each byte 0..255."""
    printable = {*range(33, 127), *range(161, 173), *range(174, 256)}
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_packaged_gguf_tokenizers_encode_any_string(name):
    """The HFTokenizers of the packaged GGUF files encode any string (Gemma 3 after its BOS), and
    decoding gives it back but for these stated differences (besides U+FFFD for a lone surrogate):
    SmolLM2 (byte-level BPE) silently drops the bytes its vocabulary has no token for: 0x04, 0x06,
    0x13, 0x14, 0x16, 0x1D (those control characters vanish) and 0xC0, 0xC1, 0xF1, 0xF2, 0xF5..0xFF
    (never in UTF-8 but for F1/F2, which lead U+40000..U+BFFFF, unassigned planes: their other
    bytes come back as U+FFFD); Gemma 3 (SentencePiece BPE with byte fallback) gives back U+2581
    `▁`, its word-boundary mark, as a space."""
    from llmclf.families import packaged, packaged_path

    try:
        path = packaged_path(name)
    except Exception as exc:  # the package is not installed
        pytest.skip(f"{name}: {exc}")
    tok = HFTokenizer.from_gguf(path, add_bos=packaged(name)[0].add_bos)
    if name == "smollm2-135m":
        missing = {b for b, char in enumerate(byte_level_alphabet()) if tok.backend.token_to_id(char) is None}
        assert missing == {0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1, 0xF1, 0xF2, *range(0xF5, 0x100)}

        def decoded(text: str) -> str:
            kept = bytes(b for b in without_surrogates(text).encode("utf-8") if b not in missing)
            return kept.decode("utf-8", "replace")
    else:
        def decoded(text: str) -> str:
            return without_surrogates(text).replace("\u2581", " ")

    @FUZZ
    @given(text=any_strings)
    @example(text="a\ud800b")
    @example(text="a\x04b\U00080000\u2581")
    def prop(text):
        check_tokenizer(tok, text, lossless=False)
        ids = tok.encode(text)
        assert tok.decode(ids[1:] if tok.bos_id is not None else ids) == decoded(text)

    prop()


@pytest.mark.slow
def test_every_property_with_the_slow_profile():
    """This file's properties at 2,000 examples each (the `fuzz-slow` profile)."""
    env = {**os.environ, "LLMCLF_FUZZ_PROFILE": "fuzz-slow"}
    result = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider",
                             "--hypothesis-show-statistics", "-m", "not slow"], env=env, capture_output=True,
                            text=True, timeout=3 * 3600)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
