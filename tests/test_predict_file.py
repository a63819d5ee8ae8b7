"""Batch prediction over files: streamed, resumable after an interruption, MC-dropout, CLI."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
from typer.testing import CliRunner

from llmclf.cli import app
from llmclf.errors import DataError
from llmclf.predict import partial_paths, predict_file
from tiny_classifier import NEGATIVE, POSITIVE, tiny_classifier_dir

runner = CliRunner()


@pytest.fixture(scope="module")
def clf_dir(tmp_path_factory, shared_dir):
    return tiny_classifier_dir(tmp_path_factory, shared_dir)


@pytest.fixture(scope="module")
def clf(clf_dir):
    from llmclf.classifier import load_classifier

    return load_classifier(clf_dir, precision="float32")


# Awkward texts on purpose: commas, quotes, embedded newlines, non-ASCII, empty.
TEXTS = [POSITIVE, NEGATIVE, 'a "quoted", comma', "two\nlines", "émoji 😀", "", "great", "sad"] * 3


def write_input(path, texts=TEXTS):
    import pandas as pd

    pd.DataFrame({"id": range(len(texts)), "text": texts}).to_csv(path, index=False)
    return path


class Interrupted(KeyboardInterrupt):
    pass


class Interrupting:
    """Wraps a classifier; the `stop_at`-th inference call raises (as Ctrl+C would). Records chunk
    sizes and what the partial output held at each call (to show it is written as it goes)."""

    def __init__(self, clf, stop_at: int, partial=None) -> None:
        self.clf, self.stop_at, self.partial = clf, stop_at, partial
        self.classes_ = clf.classes_
        self.calls, self.sizes, self.partial_sizes = 0, [], []

    def info(self):
        return self.clf.info()

    def _tick(self, texts) -> None:
        self.calls += 1
        self.sizes.append(len(texts))
        if self.partial is not None:
            self.partial_sizes.append(self.partial.stat().st_size if self.partial.exists() else -1)
        if self.calls == self.stop_at:
            raise Interrupted()

    def predict_proba(self, texts, batch_size=32):
        self._tick(texts)
        return self.clf.predict_proba(texts, batch_size)

    def predict_mc_dropout(self, texts, **kwargs):
        self._tick(texts)
        return self.clf.predict_mc_dropout(texts, **kwargs)


@pytest.mark.parametrize(("suffix", "options"), [
    (".csv", {}),
    (".jsonl", {}),
    (".tsv", {"threshold": 0.6}),
    (".csv", {"mc_dropout": 3, "dropout_rate": 0.2, "seed": 7, "threshold": 0.7}),
])
def test_an_interrupted_run_resumes_to_the_uninterrupted_output(tmp_path, clf, suffix, options):
    src = write_input(tmp_path / "in.csv")
    reference = tmp_path / f"reference{suffix}"
    predict_file(clf, src, reference, chunk_size=5, progress=False, **options)

    out = tmp_path / f"out{suffix}"
    partial, state = partial_paths(out)
    stopper = Interrupting(clf, stop_at=3, partial=partial)
    with pytest.raises(Interrupted):
        predict_file(stopper, src, out, chunk_size=5, progress=False, **options)
    assert not out.exists() and partial.exists()
    assert json.loads(state.read_text())["rows"] == 10  # two chunks saved
    assert stopper.sizes == [5, 5, 5]
    assert stopper.partial_sizes[0] < stopper.partial_sizes[1] < stopper.partial_sizes[2]  # written as it goes

    with open(partial, "ab") as f:  # a crash in the middle of writing the third chunk
        f.write(b"half-written row,\"unterminated")
    stats = predict_file(clf, src, out, chunk_size=5, progress=False, **options)
    assert stats["resumed_from"] == 10 and stats["new_rows"] == len(TEXTS) - 10 and stats["rows"] == len(TEXTS)
    assert out.read_bytes() == reference.read_bytes()
    assert not partial.exists() and not state.exists()


def test_output_rows_hold_the_texts_labels_and_probabilities(tmp_path, clf):
    import pandas as pd

    src = write_input(tmp_path / "in.csv")
    predict_file(clf, src, tmp_path / "out.csv", chunk_size=4, progress=False)
    got = pd.read_csv(tmp_path / "out.csv", dtype={"text": str}, keep_default_na=False)
    assert got["text"].tolist() == TEXTS and got["label"].tolist() == clf.predict(TEXTS)
    np.testing.assert_allclose(got[["p_neg", "p_pos"]].to_numpy(), clf.predict_proba(TEXTS), atol=1e-5)

    predict_file(clf, src, tmp_path / "mc.jsonl", mc_dropout=2, dropout_rate=0.1, threshold=0.5, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "mc.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == TEXTS
    assert set(rows[0]) == {"text", "label", "confident", "probabilities", "std"}


def test_plain_text_input_is_one_text_per_line(tmp_path, clf):
    (tmp_path / "in.txt").write_text("first\r\nsecond\n\nfourth\n", encoding="utf-8")
    stats = predict_file(clf, tmp_path / "in.txt", tmp_path / "out.jsonl", progress=False)
    rows = [json.loads(line)["text"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert rows == ["first", "second", "", "fourth"] and stats["rows"] == 4


def test_a_finished_output_is_not_replaced_without_overwrite(tmp_path, clf):
    src = write_input(tmp_path / "in.csv", TEXTS[:4])
    out = tmp_path / "out.csv"
    predict_file(clf, src, out, progress=False)
    before = out.read_bytes()
    with pytest.raises(DataError, match="already exists.*--overwrite"):
        predict_file(clf, src, out, progress=False)
    assert out.read_bytes() == before
    write_input(src, TEXTS[:6])
    assert predict_file(clf, src, out, overwrite=True, progress=False)["rows"] == 6


def test_restart_and_changed_settings(tmp_path, clf):
    src = write_input(tmp_path / "in.csv")
    out = tmp_path / "out.csv"
    with pytest.raises(Interrupted):
        predict_file(Interrupting(clf, stop_at=2), src, out, chunk_size=4, progress=False)
    with pytest.raises(DataError, match="other settings.*threshold.*--restart"):
        predict_file(clf, src, out, chunk_size=4, threshold=0.9, progress=False)
    write_input(src, TEXTS[:10])  # the input changed since the partial run
    with pytest.raises(DataError, match="input_bytes.*--restart"):
        predict_file(clf, src, out, chunk_size=4, progress=False)
    stats = predict_file(clf, src, out, chunk_size=4, restart=True, progress=False)
    assert stats["resumed_from"] == 0 and stats["rows"] == 10


def test_failures_before_any_row_leave_nothing_behind(tmp_path, clf):
    src = write_input(tmp_path / "in.csv")
    out = tmp_path / "out.csv"
    with pytest.raises(DataError, match="no column 'message'"):
        predict_file(clf, src, out, text_col="message", progress=False)
    with pytest.raises(Interrupted):
        predict_file(Interrupting(clf, stop_at=1), src, out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]
    with pytest.raises(DataError, match="must end in .csv, .tsv or .jsonl"):
        predict_file(clf, src, tmp_path / "out.parquet", progress=False)
    with pytest.raises(DataError, match="not found"):
        predict_file(clf, tmp_path / "missing.csv", out, progress=False)


class Constant:
    """A classifier that costs nothing, to measure the file pipeline's own memory."""

    classes_ = ["neg", "pos"]

    def info(self):
        return {"backbone": "constant"}

    def predict_proba(self, texts, batch_size=32):
        return np.tile([0.25, 0.75], (len(texts), 1))


def test_a_large_file_streams_in_bounded_memory(tmp_path):
    src = tmp_path / "big.txt"
    line = "a line of text that is long enough to add up, number {}\n"
    with open(src, "w", encoding="utf-8") as f:
        f.writelines(line.format(i) for i in range(40_000))  # ~2.3 MB in, ~3 MB out
    tracemalloc.start()
    try:
        stats = predict_file(Constant(), src, tmp_path / "out.csv", chunk_size=512, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stats["rows"] == 40_000 and src.stat().st_size > 2_000_000
    assert peak < 1_000_000, f"peak {peak} bytes: the file was not streamed"  # ~0.5 MB measured
    with open(tmp_path / "out.csv", encoding="utf-8") as f:
        assert sum(1 for _ in f) == 40_001


# --- CLI ---------------------------------------------------------------------------------------


def test_cli_predict_file_reports_throughput_and_protects_finished_output(tmp_path, clf_dir):
    src = write_input(tmp_path / "in.csv")
    out = tmp_path / "out.csv"
    args = ["predict", "--model", str(clf_dir), "--input", str(src), "--output", str(out), "--chunk-size", "8",
            "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"{len(TEXTS)} texts classified" in result.stdout and "texts/s" in result.stdout
    again = runner.invoke(app, args)
    assert again.exit_code != 0 and "already exists" in str(again.exception)
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0


def test_cli_predict_texts_with_mc_dropout_and_threshold(clf_dir):
    result = runner.invoke(app, ["predict", "--model", str(clf_dir), "--json", "--mc-dropout", "4",
                                 "--dropout-rate", "0.2", "--threshold", "0.5", "--seed", "1", POSITIVE, NEGATIVE])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [x["text"] for x in lines] == [POSITIVE, NEGATIVE] and [x["label"] for x in lines] == ["pos", "neg"]
    assert all(set(x) == {"text", "label", "confident", "probabilities", "std"} for x in lines)
    assert max(lines[0]["std"].values()) > 0

    plain = runner.invoke(app, ["predict", "--model", str(clf_dir), "--threshold", "0.99", POSITIVE])
    assert plain.exit_code == 0 and plain.stdout.startswith("pos\t") and "\tuncertain\t" in plain.stdout

    bad = runner.invoke(app, ["predict", "--model", str(clf_dir), "--dropout-rate", "0.2", POSITIVE])
    assert bad.exit_code == 2 and "--mc-dropout" in bad.output


def test_two_runs_never_write_the_same_output(tmp_path, clf):
    fcntl = pytest.importorskip("fcntl")
    src = write_input(tmp_path / "in.csv", TEXTS[:4])
    out = tmp_path / "out.csv"
    with open(tmp_path / "out.csv.lock", "a") as held:  # as a running predict holds it
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(DataError, match="another run is writing"):
            predict_file(clf, src, out, progress=False)
    assert predict_file(clf, src, out, progress=False)["rows"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "out.csv"]


def test_a_lock_file_removed_by_the_previous_run_is_not_trusted(tmp_path, clf, monkeypatch):
    """Run B opens OUTPUT.lock; run A, finishing, removes it; run C creates and locks a new one.
    B then gets the lock of the removed file, and must not take that for the right to write."""
    fcntl = pytest.importorskip("fcntl")
    import llmclf.predict as predict_module

    src = write_input(tmp_path / "in.csv", TEXTS[:4])
    out = tmp_path / "out.csv"
    lock = tmp_path / "out.csv.lock"
    real_open, run_c = open, []

    def open_then_lose_the_race(path, *args, **kwargs):
        f = real_open(path, *args, **kwargs)
        if str(path) == str(lock) and not run_c:
            lock.unlink()  # run A is done
            run_c.append(real_open(lock, "a"))  # run C starts
            fcntl.flock(run_c[0].fileno(), fcntl.LOCK_EX)
        return f

    monkeypatch.setattr(predict_module, "open", open_then_lose_the_race, raising=False)
    try:
        with pytest.raises(DataError, match="another run is writing"):
            predict_file(clf, src, out, progress=False)
    finally:
        run_c[0].close()
    assert not out.exists()


def test_a_run_is_not_resumed_with_another_model(tmp_path, clf, clf_dir):
    from llmclf.classifier import load_classifier

    other = load_classifier(clf_dir, precision="float32")
    other.config_ = {**other.config_, "metrics": {"validation": {"accuracy": 0.5}}}  # another fine-tune
    src = write_input(tmp_path / "in.csv")
    out = tmp_path / "out.csv"
    with pytest.raises(Interrupted):
        predict_file(Interrupting(clf, stop_at=2), src, out, chunk_size=4, progress=False)
    with pytest.raises(DataError, match="other settings.*model"):
        predict_file(other, src, out, chunk_size=4, progress=False)


def test_mc_dropout_runs_resume_only_with_the_same_chunk_size(tmp_path, clf):
    src = write_input(tmp_path / "in.csv")
    out = tmp_path / "out.csv"
    options = {"mc_dropout": 2, "dropout_rate": 0.2, "seed": 1}
    with pytest.raises(Interrupted):
        predict_file(Interrupting(clf, stop_at=2), src, out, chunk_size=4, progress=False, **options)
    with pytest.raises(DataError, match="chunk_size"):
        predict_file(clf, src, out, chunk_size=5, progress=False, **options)
    assert predict_file(clf, src, out, chunk_size=4, progress=False, **options)["resumed_from"] == 4
