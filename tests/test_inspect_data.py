"""`llmclf inspect`: flipped labels ranked first, duplicates found, the CSV's columns, clear errors."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmclf.cli import app
from llmclf.data.classification import LabelledTexts, write_labelled
from llmclf.errors import DataError
from llmclf.inspect_data import COLUMNS, ISSUES_CSV, REPORT_JSON, inspect_data

pytest.importorskip("cleanlab")
runner = CliRunner()

FLIPPED = [3, 10, 25]  # positions whose label is switched
DUPLICATE = (1, 80)  # row 80 repeats row 1's text and label


def toy() -> LabelledTexts:
    """Two classes with disjoint vocabularies, 40 each; three labels flipped; one exact duplicate."""
    rng = random.Random(0)
    spam = "free prize win cash now claim urgent offer txt reply winner".split()
    ham = "meeting lunch tomorrow see you later home dinner mum call office".split()
    texts, labels = [], []
    for _ in range(40):
        texts += [" ".join(rng.sample(spam, 6)), " ".join(rng.sample(ham, 6))]
        labels += ["spam", "ham"]
    for i in FLIPPED:
        labels[i] = "ham" if labels[i] == "spam" else "spam"
    texts.append(texts[DUPLICATE[0]])
    labels.append(labels[DUPLICATE[0]])
    return LabelledTexts(texts, labels, "toy")


@pytest.fixture(scope="module")
def inspected(tmp_path_factory) -> tuple[Path, dict]:
    data_file = tmp_path_factory.mktemp("data") / "toy.csv"
    write_labelled(toy(), data_file)
    out = tmp_path_factory.mktemp("inspect")
    result = runner.invoke(app, ["inspect", "--data", str(data_file), "--out", str(out), "--top", "3"])
    assert result.exit_code == 0, result.output
    return out, {"output": result.output}


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / ISSUES_CSV, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_flipped_labels_rank_first_and_are_issues(inspected):
    out, _ = inspected
    rows = _rows(out)
    top = rows[:len(FLIPPED)]
    assert sorted(int(r["row"]) - 1 for r in top) == FLIPPED  # rows are 1-based records
    assert all(r["is_issue"] == "True" and r["suggested_label"] != r["given_label"] for r in top)
    assert sum(r["is_issue"] == "True" for r in rows) <= len(FLIPPED) + 1
    qualities = [float(r["label_quality"]) for r in rows]
    assert qualities == sorted(qualities)


def test_csv_columns_every_row_and_the_duplicate(inspected):
    out, _ = inspected
    rows = _rows(out)
    assert tuple(rows[0]) == COLUMNS
    assert sorted(int(r["row"]) for r in rows) == list(range(1, len(toy()) + 1))
    by_row = {int(r["row"]) - 1: r for r in rows}
    first, copy = DUPLICATE
    assert by_row[copy]["duplicate_of"] == str(first + 1)
    assert by_row[first]["duplicate_of"] == ""  # the first of a group points nowhere
    assert all(float(r["outlier_score"]) >= 0 for r in rows)


def test_report_and_printed_lines(inspected):
    out, result = inspected
    report = json.loads((out / REPORT_JSON).read_text(encoding="utf-8"))
    assert report["examples"] == len(toy()) and report["classes"] == ["ham", "spam"]
    assert report["label_issues"] >= len(FLIPPED) and report["near_duplicates"] >= 1
    assert report["overlapping_classes"][0]["examples"] >= len(FLIPPED)
    assert "likely label errors" in result["output"] and result["output"].count(" -> ") == 3


def test_backbone_features_find_the_duplicate(tiny_checkpoint):
    data = toy()
    result = inspect_data(data, model=str(tiny_checkpoint), folds=3, progress=False)
    assert len(result.rows) == len(data) and result.pred_probs.shape == (len(data), 2)
    by_row = {r["row"] - 1: r for r in result.rows}
    assert by_row[DUPLICATE[1]]["duplicate_of"] == DUPLICATE[0] + 1


def test_clear_errors(tmp_path):
    with pytest.raises(DataError, match="single label"):
        inspect_data(LabelledTexts(["a", "b", "c"], ["x", "x", "x"], "one.csv"))
    with pytest.raises(DataError, match="'y' has 2 example\\(s\\), fewer than the 5 folds"):
        inspect_data(LabelledTexts(["a"] * 6 + ["b"] * 2, ["x"] * 6 + ["y"] * 2, "few.csv"))
    result = runner.invoke(app, ["inspect", "--data", str(tmp_path / "missing.csv")])
    assert result.exit_code != 0 and "data file not found" in (result.output + str(result.exception))
