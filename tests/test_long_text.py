"""`--long-text chunk[:LEN[:STRIDE]]` and `--aggregate`: windows, aggregation, both engines, CLI, server, ONNX."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from llmclf import long_text
from llmclf.classifier import load_classifier
from llmclf.cli import app
from llmclf.data.classification import LabelledTexts, read_labelled, write_labelled
from llmclf.errors import ConfigError
from llmclf.training.args import TrainArgs

runner = CliRunner()
FILLER = "the movie plot was long and the actors came and went".split()
WORDS = {"pos": "great wonderful happy".split(), "neg": "awful terrible sad".split()}


def _doc(rng: random.Random, label: str) -> str:
    """A review whose label shows in a few words somewhere in the middle of 30-50 filler words."""
    before, after = rng.randint(15, 30), rng.randint(5, 15)
    words = [rng.choice(FILLER) for _ in range(before)] + [rng.choice(WORDS[label]) for _ in range(3)]
    return " ".join(words + [rng.choice(FILLER) for _ in range(after)])


def _docs(n: int, seed: int) -> LabelledTexts:
    rng = random.Random(seed)
    labels = ["pos" if i % 2 else "neg" for i in range(n)]
    return LabelledTexts([_doc(rng, label) for label in labels], labels, f"docs-{seed}")


# --- windows and aggregation -------------------------------------------------------------------


@given(n=st.integers(0, 400), size=st.integers(1, 50), data=st.data())
def test_windows_cover_the_whole_text_with_the_overlap(n: int, size: int, data):
    overlap = data.draw(st.integers(0, size - 1))
    spans = long_text.spans(n, size, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == n
    assert all(end - start == size for start, end in spans[:-1]) and 0 <= spans[-1][1] - spans[-1][0] <= size
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert end - start == overlap  # consecutive windows share exactly `overlap` tokens
    covered = set().union(*(range(a, b) for a, b in spans))
    assert covered == set(range(n))


def test_aggregation_equals_hand_computation():
    logits = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]])
    assert torch.allclose(long_text.aggregate(logits, "mean"), torch.tensor([2.0, -1.0, -0.25]))
    assert torch.allclose(long_text.aggregate(logits, "max"), torch.tensor([3.0, 0.0, 0.5]))
    lse = [np.log(np.exp(1.0) + np.exp(3.0)), np.log(np.exp(-2.0) + 1.0), np.log(np.exp(0.5) + np.exp(-1.0))]
    assert torch.allclose(long_text.aggregate(logits, "logsumexp"), torch.tensor(lse, dtype=torch.float32))
    # per text: the softmax of the aggregate of its windows' log-probabilities; logsumexp = mean probability
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], dtype=np.float32)
    out = long_text.to_documents(probs, [0, 0, 1], 2, "logsumexp")
    np.testing.assert_allclose(out, [[0.55, 0.45], [0.6, 0.4]], atol=1e-6)
    geo = np.sqrt(probs[0] * probs[1])
    np.testing.assert_allclose(long_text.to_documents(probs, [0, 0, 1], 2, "mean")[0], geo / geo.sum(), atol=1e-6)
    np.testing.assert_allclose(long_text.to_documents(probs, [0, 0, 1], 2, "max")[0], [0.9 / 1.7, 0.8 / 1.7],
                               atol=1e-6)


def test_bad_specs_are_clear_errors():
    assert TrainArgs().long_text == "truncate" and TrainArgs.for_engine("hf").long_text == "truncate"
    for spec, words in (("chunk:64:64", "STRIDE 64 >= LEN 64"), ("chunk:64:100", "smaller than the window"),
                        ("chunks", "truncate or chunk"), ("chunk:x", "whole numbers"), ("chunk:64:-1", ">= 0"),
                        ("chunk:1", "at least 2")):
        with pytest.raises(ConfigError, match="--long-text") as exc:
            TrainArgs.for_engine("scratch", long_text=spec)
        assert words in str(exc.value), spec
    with pytest.raises(ConfigError, match="--aggregate must be one of mean, max, logsumexp"):
        TrainArgs.for_engine("scratch", aggregate="median")


# --- a scratch model trained through the CLI ---------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("long-docs")
    for name, n, seed in (("train", 16, 1), ("validation", 8, 2), ("test", 6, 3)):
        write_labelled(_docs(n, seed), out / f"{name}.csv")
    return out


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory, tokenizer) -> Path:
    from llmclf.config import GPTConfig
    from llmclf.loaders.checkpoint import save_checkpoint
    from llmclf.models.gpt2 import GPTModel

    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=50257, context_length=32, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0))
    return save_checkpoint(tmp_path_factory.mktemp("lm") / "tiny", model, tokenizer)


@pytest.fixture(scope="module")
def chunk_dir(tmp_path_factory, lm_dir: Path, data_dir: Path) -> Path:
    """`llmclf train --long-text chunk:24:4 --aggregate max` (head on cached per-window features, the
    TF-IDF blend with 2 out-of-fold folds of texts)."""
    out = tmp_path_factory.mktemp("run") / "clf"
    result = runner.invoke(app, [
        "train", "--model", str(lm_dir), "--train", str(data_dir / "train.csv"), "--val",
        str(data_dir / "validation.csv"), "--out", str(out), "--long-text", "chunk:24:4", "--aggregate", "max",
        "--epochs", "1", "--lr", "3e-3", "--ensemble-folds", "2", "--precision", "float32", "--json"])
    assert result.exit_code == 0, result.output
    return out


def test_the_setting_is_saved_and_a_text_is_the_aggregate_of_its_windows(chunk_dir: Path, data_dir: Path):
    config = json.loads((chunk_dir / "config.json").read_text())
    assert config["training"]["long_text"] == "chunk:24:4" and config["training"]["aggregate"] == "max"
    assert config["max_length"] == 24
    clf = load_classifier(chunk_dir, precision="float32")
    assert (clf.long_text_, clf.aggregate_) == ("chunk:24:4", "max")
    assert clf.info()["long_text"] == "chunk:24:4"
    text = read_labelled(data_dir / "test.csv").texts[0]
    windows = list(long_text.window_texts(clf, text, long_text.windowing(clf)))
    assert len(windows) >= 3
    assert all(len(ids) <= 24 for ids in clf.token_ids(windows))  # template + window text fit the window
    per_window = torch.log(torch.from_numpy(clf._probabilities(windows, 8, dropout=False)))
    expected = torch.softmax(per_window.max(dim=0).values, dim=-1).numpy()
    np.testing.assert_allclose(clf._text_probabilities([text], 8, dropout=False)[0], expected, atol=1e-6)
    # the whole classifier: that, blended with the n-grams of the full text, calibrated
    full = clf._calibrated(clf._with_ngrams(expected[None], [text]))
    np.testing.assert_allclose(clf.predict_proba([text]), full, atol=1e-6)
    # the windows overlap and, joined, give back the text
    ids = long_text._text_ids(clf.tokenizer_, text)
    w = long_text.windowing(clf)
    assert (w.text_tokens, w.stride) == (24 - long_text.template_tokens(clf), 4)
    joined = [i for k, (a, b) in enumerate(long_text.spans(len(ids), w.text_tokens, w.stride))
              for i in ids[a if k == 0 else a + w.stride:b]]
    assert clf.tokenizer_.decode(joined) == text


def test_cli_predict_and_evaluate_read_the_setting_from_the_model(chunk_dir: Path, data_dir: Path, tmp_path: Path):
    clf = load_classifier(chunk_dir, precision="float32")
    test = read_labelled(data_dir / "test.csv")
    result = runner.invoke(app, ["predict", "--model", str(chunk_dir), "--json", "--precision", "float32",
                                 test.texts[0]])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output.strip().splitlines()[-1])
    record = record[0] if isinstance(record, list) else record
    np.testing.assert_allclose([record["probabilities"][c] for c in clf.classes_], clf.predict_proba(test.texts[0])[0],
                               atol=1e-5)
    result = runner.invoke(app, ["predict", "--model", str(chunk_dir), "--input", str(data_dir / "test.csv"),
                                 "--output", str(tmp_path / "out.jsonl"), "--precision", "float32"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == clf.predict(test.texts)
    result = runner.invoke(app, ["evaluate", "--model", str(chunk_dir), "--data", str(data_dir / "test.csv"),
                                 "--json", "--precision", "float32"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output[result.output.index("{"):])
    assert metrics["accuracy"] == pytest.approx(clf.evaluate(test)["accuracy"])


def test_server_classifies_long_texts_by_windows(chunk_dir: Path, data_dir: Path):
    from llmclf.serve.app import create_app

    clf = load_classifier(chunk_dir, precision="float32")
    texts = read_labelled(data_dir / "test.csv").texts[:3]

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(clf)), base_url="http://t") as c:
            return await c.post("/v1/classify", json={"texts": texts}), await c.get("/v1/model"), await c.get("/")

    r, model, page = asyncio.run(go())
    assert r.status_code == 200, r.text
    got = np.array([[x["probabilities"][c] for c in clf.classes_] for x in r.json()["results"]])
    np.testing.assert_allclose(got, clf.predict_proba(texts), atol=1e-5)
    assert model.json()["long_text"] == "chunk:24:4" and model.json()["aggregate"] == "max"
    assert '"long_text": "chunk:24:4"' in page.text  # the web page says how long texts are read


def test_onnx_export_classifies_windows_in_python(chunk_dir: Path, data_dir: Path, tmp_path: Path):
    from llmclf.export import export_model

    export_model(chunk_dir, tmp_path / "onnx", "onnx")
    onnx = load_classifier(tmp_path / "onnx", backend="onnx", precision="float32")
    clf = load_classifier(chunk_dir, precision="float32")
    assert (onnx.long_text_, onnx.aggregate_, onnx.max_length_) == ("chunk:24:4", "max", 24)
    texts = read_labelled(data_dir / "test.csv").texts
    np.testing.assert_allclose(onnx.predict_proba(texts), clf.predict_proba(texts), atol=1e-4)


def test_truncate_is_unchanged(lm_dir: Path, data_dir: Path):
    from llmclf.engines.scratch import TextClassifier

    clf = TextClassifier(str(lm_dir), epochs=1, ensemble="none", calibration="none", precision="float32",
                         template=None)
    clf.fit(read_labelled(data_dir / "train.csv"), read_labelled(data_dir / "validation.csv"), progress=False)
    assert (clf.long_text_, clf.max_length_) == ("truncate", 32)
    texts = read_labelled(data_dir / "test.csv").texts
    np.testing.assert_array_equal(clf.predict_proba(texts), clf._probabilities(texts, 32, dropout=False))


def test_windows_that_do_not_fit_are_clear_errors(lm_dir: Path, data_dir: Path):
    from llmclf.engines.scratch import TextClassifier

    train, val = read_labelled(data_dir / "train.csv"), read_labelled(data_dir / "validation.csv")
    cases = (("chunk:64", "a window of 64 tokens is longer than the model's context of 32 tokens"),
             ("chunk:12", "the template and special tokens alone take 15 tokens"),
             ("chunk:20:8", "STRIDE 8 >= the 5 text tokens of a window (20 minus 15"))
    for spec, message in cases:
        with pytest.raises(ConfigError, match="--long-text") as exc:
            TextClassifier(str(lm_dir), long_text=spec, epochs=1, precision="float32").fit(train, val, progress=False)
        assert message in str(exc.value), (spec, str(exc.value))
    with pytest.raises(ConfigError, match="give one of them"):
        TextClassifier(str(lm_dir), long_text="chunk:24", max_length=16).fit(train, val, progress=False)


def test_a_1mb_text_is_classified_a_few_windows_at_a_time(chunk_dir: Path):
    clf = load_classifier(chunk_dir, precision="float32")
    calls: list[int] = []

    def probabilities(texts, batch_size, dropout):
        calls.append(len(texts))
        return np.full((len(texts), 2), 0.5, dtype=np.float32)

    clf._probabilities = probabilities
    text = " ".join(random.Random(0).choice(FILLER) for _ in range(300_000))[:1_000_000]
    assert len(text) == 1_000_000
    probs = clf._text_probabilities([text, "short"], batch_size=8, dropout=False)
    w = long_text.windowing(clf)
    n_windows = len(long_text.spans(len(long_text._text_ids(clf.tokenizer_, text)), w.text_tokens, w.stride))
    assert sum(calls) == n_windows + 1 and n_windows > 10_000
    assert max(calls) <= 8 * long_text.GROUP_BATCHES  # never more than a group of windows at once
    np.testing.assert_allclose(probs, 0.5)


# --- the Transformers engine -------------------------------------------------------------------


def test_hf_engine_trains_and_predicts_on_windows(tmp_path: Path):
    from llmclf.engines.hf import HFClassifier
    from test_hf_engine import WORDS as BERT_WORDS
    from test_hf_engine import _tiny_bert_dir

    bert = _tiny_bert_dir(tmp_path / "bert")
    rng = random.Random(0)

    def docs(n: int) -> LabelledTexts:
        labels = ["pos" if i % 2 else "neg" for i in range(n)]
        texts = [" ".join([*rng.choices(BERT_WORDS[6:], k=20), rng.choice(BERT_WORDS[:3] if y == "pos" else
                                                                          BERT_WORDS[3:6]),
                           *rng.choices(BERT_WORDS[6:], k=30)]) for y in labels]
        return LabelledTexts(texts, labels, "bert-docs")

    clf = HFClassifier(str(bert), long_text="chunk:16:4", aggregate="mean", epochs=1, batch_size=8,
                       precision="float32", calibration="none")
    clf.fit(docs(16), docs(8), out_dir=tmp_path / "clf", progress=False)
    loaded = load_classifier(tmp_path / "clf", precision="float32")
    assert (loaded.long_text_, loaded.aggregate_, loaded.max_length_) == ("chunk:16:4", "mean", 16)
    text = docs(1).texts[0]
    windows = list(long_text.window_texts(loaded, text, long_text.windowing(loaded)))
    assert len(windows) >= 4 and all(len(ids) <= 16 for ids in loaded.token_ids(windows))
    per_window = torch.log(torch.from_numpy(loaded._probabilities(windows, 8, dropout=False)))
    expected = torch.softmax(per_window.mean(dim=0), dim=-1).numpy()
    np.testing.assert_allclose(loaded.predict_proba(text)[0], expected, atol=1e-5)
    with pytest.raises(ConfigError, match="longer than the model's context of 64"):
        HFClassifier(str(bert), long_text="chunk:100", epochs=1).fit(docs(4), docs(2), progress=False)
