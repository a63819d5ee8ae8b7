"""Multi-label classification (`llmclf.multilabel`): data, split, training in both engines, thresholds,
predict (texts and files), serving, evaluation and the ONNX export."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from llmclf.cli import app
from llmclf.data.classification import LabelledTexts, read_labelled, split_file, split_labelled, write_labelled
from llmclf.errors import ConfigError, DataError
from llmclf.multilabel import decide_sets, iterative_split, tune_thresholds
from tiny_classifier import TOPICS, topic_texts

runner = CliRunner()
# --- data ------------------------------------------------------------------------------------------

def test_labels_split_by_a_separator_or_read_from_json_lists(tmp_path: Path):
    (tmp_path / "a.csv").write_text('text,label\none,"b, a"\ntwo,c\nthree,"a,a"\n', encoding="utf-8")
    data = read_labelled(tmp_path / "a.csv", label_sep=",")
    assert data.labels == ["a,b", "c", "a"] and data.label_sep == ","
    assert read_labelled(tmp_path / "a.csv").labels == ["b, a", "c", "a,a"]  # without a separator: one label
    (tmp_path / "b.jsonl").write_text('{"text": "one", "label": ["World", "Sports"]}\n'
                                      '{"text": "two", "label": "Business"}\n', encoding="utf-8")
    data = read_labelled(tmp_path / "b.jsonl")
    assert data.labels == ["Sports,World", "Business"] and data.label_sep == ","
    assert read_labelled(tmp_path / "b.jsonl", label_sep="|").labels == ["Sports|World", "Business"]


@pytest.mark.parametrize("content, name, message", [
    ('text,label\none,"a,,b"\n', "x.csv", "row 2: the label set 'a,,b' holds an empty label"),
    ('text,label\none,","\n', "x.csv", "row 2: the label set ',' holds an empty label"),
    ('{"text": "one", "label": []}\n', "x.jsonl", "line 1: the label set is empty"),
    ('{"text": "one", "label": ["a", ""]}\n', "x.jsonl", "line 1: the label set ['a', ''] holds an empty label"),
    ('{"text": "one", "label": ["a,b"]}\n', "x.jsonl", "the label 'a,b' holds the separator ','"),
    ('{"text": ["one"], "label": "a"}\n', "x.jsonl", "'text' is a JSON list, not a text"),
])
def test_bad_label_sets_are_clear_errors(tmp_path: Path, content: str, name: str, message: str):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]").replace("|", r"\|")):
        read_labelled(tmp_path / name, label_sep="," if name.endswith(".csv") else None)


def test_iterative_split_keeps_every_label_in_train_and_stratifies():
    rng = random.Random(0)
    sets = [sorted(rng.sample("abcdef", rng.randint(1, 3))) for _ in range(300)] + [["rare"], ["rare"], ["once"]]
    train, val, test = iterative_split(sets, (0.7, 0.1, 0.2), seed=1)
    assert sorted(train + val + test) == list(range(len(sets)))
    assert abs(len(train) - 0.7 * len(sets)) < 10 and abs(len(test) - 0.2 * len(sets)) < 10
    in_train = {name for i in train for name in sets[i]}
    assert in_train == {name for names in sets for name in names}
    for label in "abcdef":  # each label's share of the test part is near 20 %
        n = sum(label in names for names in sets)
        assert abs(sum(label in sets[i] for i in test) - 0.2 * n) <= 2


def test_split_file_stratifies_multi_label_data(tmp_path: Path):
    write_labelled(topic_texts(60, 1), tmp_path / "all.csv")
    counts = split_file(tmp_path / "all.csv", tmp_path / "out", stratify=True, label_sep=",")
    assert sum(n for n, _ in counts.values()) == 60
    train = read_labelled(tmp_path / "out" / "train.csv", label_sep=",")
    assert {name for label in train.labels for name in label.split(",")} == set(TOPICS)
    result = runner.invoke(app, ["data", "split", str(tmp_path / "all.csv"), "--out", str(tmp_path / "cli"),
                                 "--stratify", "--label-sep", ","])
    assert result.exit_code == 0, result.output
    assert read_labelled(tmp_path / "cli" / "test.csv", label_sep=",").labels == \
        split_labelled(read_labelled(tmp_path / "all.csv", label_sep=","), stratify=True)[2].labels


def test_thresholds_are_tuned_per_label():
    probs = np.array([[0.9, 0.30], [0.8, 0.35], [0.2, 0.10], [0.1, 0.22]])
    y = np.array([[1, 1], [1, 1], [0, 0], [0, 0]])
    # label 0: every threshold from 0.25 to 0.75 is perfect, 0.5 is closest to 0.5; label 1: 0.25 and 0.3 are
    assert tune_thresholds(probs, y) == [0.5, 0.3]
    assert decide_sets(np.array([[0.1, 0.2]]), [0.5, 0.5]).tolist() == [[False, True]]  # at least one label


# --- training, prediction, serving: the scratch engine (tiny GPT-2) ---------------------------------

@pytest.fixture(scope="module")
def topic_files(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("topics")
    for name, n, seed in (("train", 96, 1), ("validation", 30, 2), ("test", 30, 3)):
        write_labelled(topic_texts(n, seed), out / f"{name}.csv")
    return out


@pytest.fixture(scope="module")
def scratch_dir(tmp_path_factory, topic_files: Path, tokenizer) -> Path:
    """`llmclf train --label-sep ,` of a tiny random GPT-2 on the toy topics."""
    from llmclf.config import GPTConfig
    from llmclf.loaders.checkpoint import save_checkpoint
    from llmclf.models.gpt2 import GPTModel

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("ml-scratch")
    lm = save_checkpoint(root / "lm", GPTModel(GPTConfig(context_length=64, emb_dim=32, n_heads=4, n_layers=2,
                                                         drop_rate=0.0)), tokenizer)
    out = root / "clf"
    result = runner.invoke(app, [
        "train", "--model", str(lm), "--train", str(topic_files / "train.csv"),
        "--val", str(topic_files / "validation.csv"), "--test", str(topic_files / "test.csv"), "--out", str(out),
        "--label-sep", ",", "--pooling", "mean", "--template", "{text}", "--epochs", "6", "--lr", "0.05",
        "--batch-size", "8", "--class-weights", "balanced", "--precision", "float32", "--json"])
    assert result.exit_code == 0, result.output
    return out


def test_scratch_engine_learns_and_saves_thresholds(scratch_dir: Path, topic_files: Path, tmp_path: Path):
    from llmclf.classifier import load_classifier

    config = json.loads((scratch_dir / "config.json").read_text())
    assert config["labels"] == ["money", "sport", "tech"] and config["training"]["label_sep"] == ","
    assert set(config["multi_label"]["thresholds"]) == set(TOPICS) and config["multi_label"]["label_sep"] == ","
    assert not (scratch_dir / "ngrams.safetensors").exists()  # the blend is off for multi-label
    test = json.loads((scratch_dir / "test_metrics.json").read_text())
    assert test["multi_label"] and test["micro_f1"] > 0.9 and test["subset_accuracy"] > 0.8, test
    assert set(test) >= {"macro_f1", "samples_f1", "hamming_loss", "per_class", "thresholds"}
    clf = load_classifier(scratch_dir)
    assert clf.label_thresholds.thresholds == [config["multi_label"]["thresholds"][c] for c in clf.classes_]
    probs = clf.predict_proba(["note: goal match team and chip code robot"])
    assert probs.shape == (1, 3) and not np.isclose(probs.sum(), 1.0)  # sigmoids, not a softmax
    assert clf.predict(["note: goal match team and chip code robot", "note: bank stock price"]) == \
        ["sport,tech", "money"]
    with pytest.raises(ConfigError, match="MC-dropout is for single-label models"):
        clf.predict_mc_dropout(["x"], passes=2)
    with pytest.raises(DataError, match=r"labels \['weather'\] are not among the model's"):
        clf.evaluate(LabelledTexts(["sunny"], ["weather,tech"], "only-in-test", ","))

    result = runner.invoke(app, ["evaluate", "--model", str(scratch_dir), "--data", str(topic_files / "test.csv"),
                                 "--plots", str(tmp_path / "plots")])
    assert result.exit_code == 0, result.output
    assert "micro-F1" in result.output and "Hamming loss" in result.output
    assert (tmp_path / "plots" / "per_label.png").stat().st_size > 1000


def test_predict_file_writes_every_label_over_its_threshold(scratch_dir: Path, tmp_path: Path):
    (tmp_path / "in.txt").write_text("note: goal match team and bank stock price\nnote: chip code robot\n",
                                     encoding="utf-8")
    for suffix in ("csv", "jsonl"):
        result = runner.invoke(app, ["predict", "--model", str(scratch_dir), "--input", str(tmp_path / "in.txt"),
                                     "--output", str(tmp_path / f"out.{suffix}")])
        assert result.exit_code == 0, result.output
    rows = read_labelled(tmp_path / "out.csv", label_sep=",")
    assert rows.labels == ["money,sport", "tech"]
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(records[0]["labels"]) == ["money", "sport"] and records[1]["labels"] == ["tech"]
    assert set(records[0]["thresholds"]) == set(TOPICS)
    result = runner.invoke(app, ["predict", "--model", str(scratch_dir), "--json", "note: chip code robot"])
    assert result.exit_code == 0, result.output
    assert '"labels": [\n      "tech"\n    ]' in result.output or '"labels": ["tech"]' in result.output


def test_server_returns_every_label(scratch_dir: Path):
    from fastapi.testclient import TestClient

    from llmclf.classifier import load_classifier
    from llmclf.serve.app import create_app

    with TestClient(create_app(load_classifier(scratch_dir))) as client:
        response = client.post("/v1/classify", json={"texts": ["note: goal match team and chip code robot"]})
        assert response.status_code == 200, response.text
        result = response.json()["results"][0]
        assert sorted(result["labels"]) == ["sport", "tech"] and result["label"] == "sport,tech"
        assert set(result["thresholds"]) == set(TOPICS)
        response = client.post("/v1/classify", json={"texts": ["x"], "mc_dropout": 2})
        assert response.status_code == 422 and "single-label" in response.json()["detail"]


def test_the_onnx_graph_computes_sigmoids_for_a_multi_label_model(scratch_dir: Path):
    from llmclf.classifier import load_classifier
    from llmclf.export.onnx import ProbabilitiesFromIds

    clf = load_classifier(scratch_dir, precision="float32")
    module = ProbabilitiesFromIds(clf.model_, transformers_model=False, multi_label=True).eval()
    ids = torch.tensor(clf.token_ids(["note: bank stock price"]))
    with torch.no_grad():
        probs = module(ids, torch.ones_like(ids)).numpy()
    np.testing.assert_allclose(probs, clf.predict_proba(["note: bank stock price"]), atol=1e-5)
    assert clf.fitted_config()["multi_label"]["thresholds"] == dict(zip(clf.classes_, clf.label_thresholds.thresholds,
                                                                       strict=True))  # (the sidecar's entry)


@pytest.mark.slow  # the export itself takes 15-60 s here
def test_onnx_export_keeps_sigmoids_and_thresholds(scratch_dir: Path, tmp_path: Path):
    pytest.importorskip("onnxruntime")
    from llmclf.classifier import load_classifier

    result = runner.invoke(app, ["export", "--model", str(scratch_dir), "--format", "onnx", "--out",
                                 str(tmp_path / "onnx")])
    assert result.exit_code == 0, result.output
    torch_clf, onnx_clf = load_classifier(scratch_dir, precision="float32"), load_classifier(tmp_path / "onnx")
    texts = ["note: goal match team and chip code robot", "note: bank stock price"]
    np.testing.assert_allclose(onnx_clf.predict_proba(texts), torch_clf.predict_proba(texts), atol=1e-4)
    assert onnx_clf.predict(texts) == torch_clf.predict(texts)
    assert onnx_clf.label_thresholds == torch_clf.label_thresholds


def test_labels_only_in_validation_and_refused_options_are_clear(tokenizer, tiny_checkpoint: Path):
    from llmclf.engines.scratch import TextClassifier

    train = topic_texts(12, 1)
    val = LabelledTexts(["rain"], ["sport,weather"], "val.csv", ",")
    with pytest.raises(DataError, match=r"val.csv: labels \['weather'\] do not occur in the training data"):
        TextClassifier(str(tiny_checkpoint), epochs=1).fit(train, val, progress=False)
    with pytest.raises(ConfigError, match="--tune-threshold is for one binary decision"):
        TextClassifier(str(tiny_checkpoint), tune_threshold="f1").fit(train, topic_texts(6, 2), progress=False)
    with pytest.raises(ConfigError, match="--long-text chunk:64 aggregates windows' softmax"):
        TextClassifier(str(tiny_checkpoint), long_text="chunk:64").fit(train, topic_texts(6, 2), progress=False)


def test_the_python_api_splits_labels_by_the_label_sep_option(tiny_checkpoint: Path):
    from llmclf.engines.scratch import TextClassifier

    train = LabelledTexts(*(lambda d: (d.texts, d.labels))(topic_texts(24, 1, sep="|")), "api")  # read as plain
    clf = TextClassifier(str(tiny_checkpoint), label_sep="|", epochs=1, template=None, precision="float32")
    clf.fit(train, topic_texts(6, 2, sep="|"), progress=False)
    assert clf.classes_ == ["money", "sport", "tech"] and clf.label_thresholds.sep == "|"
    assert all(set(p.split("|")) <= set(TOPICS) for p in clf.predict(["goal match team"]))


# --- the Transformers engine (tiny BERT) -------------------------------------------------------------

def _trigger_data(n: int, name: str, rng: random.Random) -> LabelledTexts:
    """Texts of the tiny BERT's words: label x, y, z wherever its word (good, bad, plot) occurs."""
    from test_hf_engine import WORDS

    triggers = {"x": "good", "y": "bad", "z": "plot"}
    texts, labels = [], []
    for i in range(n):
        chosen = sorted(rng.sample(sorted(triggers), 1 if i % 2 else 2))
        words = [triggers[c] for c in chosen] + rng.sample(WORDS[6:8], 2)
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(",".join(chosen))
    return LabelledTexts(texts, labels, name, ",")


def _fit_tiny_bert(tmp_path: Path, epochs: int, n_train: int):
    from llmclf.engines.hf import HFClassifier
    from test_hf_engine import _tiny_bert_dir

    rng = random.Random(0)
    bert = _tiny_bert_dir(tmp_path / "bert", dropout=0.0)
    clf = HFClassifier(str(bert), epochs=epochs, lr=2e-3, batch_size=8, precision="float32", log_every=1000,
                       lr_schedule="constant")
    clf.fit(_trigger_data(n_train, "train", rng), _trigger_data(24, "val", rng), out_dir=tmp_path / "clf",
            progress=False)
    return clf, _trigger_data(30, "test", rng)


def test_hf_engine_trains_one_sigmoid_per_label_and_reloads(tmp_path: Path):
    from llmclf.classifier import load_classifier

    clf, test = _fit_tiny_bert(tmp_path, epochs=1, n_train=32)
    losses = [e["loss"] for e in clf.history_["evaluations"]]
    assert 0.5 < losses[0] < 0.9, losses  # binary cross-entropy per label: about ln 2 at the start
    metrics = clf.evaluate(test)
    assert metrics["multi_label"] and set(metrics["thresholds"]) == {"x", "y", "z"}, metrics
    loaded = load_classifier(tmp_path / "clf", precision="float32")
    assert loaded.model_.config.problem_type == "multi_label_classification"
    assert loaded.label_thresholds == clf.label_thresholds
    probs = clf.predict_proba(test.texts)
    assert not np.allclose(probs.sum(axis=1), 1.0)  # sigmoids, not a softmax
    np.testing.assert_allclose(loaded.predict_proba(test.texts), probs, atol=1e-5)
    assert loaded.predict(test.texts) == clf.predict(test.texts)
    result = runner.invoke(app, ["export", "--model", str(tmp_path / "clf"), "--format", "hf", "--out",
                                 str(tmp_path / "exported")])  # checks Transformers' sigmoids against llmclf's
    assert result.exit_code == 0, result.output
    exported = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert exported["problem_type"] == "multi_label_classification"
    assert exported["llmclf"]["multi_label"]["thresholds"] == metrics["thresholds"]


@pytest.mark.slow
def test_hf_engine_learns_a_multi_label_task(tmp_path: Path):
    clf, test = _fit_tiny_bert(tmp_path, epochs=10, n_train=64)
    losses = [e["loss"] for e in clf.history_["evaluations"]]
    assert losses[-1] < 0.5 < losses[0], losses
    assert clf.evaluate(test)["macro_f1"] > 0.7


def test_the_ag_news_multi_label_set(shared_dir: Path):
    """The real set of bench/bench_multilabel.py, built from ../shared (AG News is not shipped: its licence)."""
    from llmclf.data.classification import ag_news_multilabel

    data = ag_news_multilabel(shared_dir / "data" / "ag_news" / "test.csv", n=200, pair_share=0.4, seed=1)
    sets = [label.split(",") for label in data.labels]
    assert len(data) == 200 and sum(len(s) == 2 for s in sets) == 80 and all(len(set(s)) == len(s) for s in sets)
    assert {name for s in sets for name in s} == {"World", "Sports", "Business", "Sci/Tech"}
    pair = data.texts[next(i for i, s in enumerate(sets) if len(s) == 2)]
    assert " / " in pair
    train, val, test = split_labelled(data, (0.6, 0.15, 0.25), stratify=True)
    assert len(train) + len(val) + len(test) == 200 and set(train.labels) >= {"World", "Sports"}
