"""`--ensemble tfidf`: the n-gram model (llmclf.ngrams) and its place in both engines."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from llmclf.classifier import load_classifier
from llmclf.cli import app
from llmclf.config import GPTConfig
from llmclf.data.classification import LabelledTexts, write_labelled
from llmclf.engines.scratch import TextClassifier
from llmclf.errors import ConfigError
from llmclf.loaders.checkpoint import save_checkpoint
from llmclf.models.gpt2 import GPTModel
from llmclf.ngrams import N_FEATURES, NGRAMS_FILE, NgramModel, _tfidf, fit_blend_weights, ngram_counts

runner = CliRunner()
TOPICS = {"sport": "match goal team score league", "money": "bank market shares profit stock",
          "tech": "software chip computer code internet"}


def _topics(n: int, seed: int, labels: tuple[str, ...] = ("money", "sport", "tech")) -> LabelledTexts:
    rng = random.Random(seed)
    filler = "the a of and today news report said new".split()
    texts, gold = [], []
    for i in range(n):
        label = labels[i % len(labels)]
        words = rng.sample(TOPICS[label].split(), 2) + rng.sample(filler, 3)
        rng.shuffle(words)
        texts.append(" ".join(words))
        gold.append(label)
    return LabelledTexts(texts, gold, f"topics-{seed}")


def test_features_are_scikit_learns_sublinear_tfidf_of_the_hashed_ngrams():
    from sklearn.feature_extraction.text import TfidfTransformer

    texts = [*_topics(29, 1).texts, "qzxj"]  # with character n-grams that only one text has
    counts = ngram_counts(texts)
    model = NgramModel.fit(texts, [i % 3 for i in range(30)], 3)
    ours = _tfidf(counts, model.idf.astype(np.float64))
    words = TfidfTransformer(sublinear_tf=True).fit_transform(counts[:, :N_FEATURES])
    np.testing.assert_allclose(ours[:, :N_FEATURES].toarray(), words.toarray(), atol=1e-6)
    chars = counts[:, N_FEATURES:]
    seen_once = np.flatnonzero(np.bincount(chars.indices, minlength=N_FEATURES) == 1)
    assert seen_once.size and not model.idf[N_FEATURES + seen_once].any()  # char n-grams need 2 texts (min_df)


@pytest.mark.parametrize("labels", [("money", "sport"), ("money", "sport", "tech")])
def test_scores_are_the_logistic_regressions_probabilities(labels):
    from sklearn.linear_model import LogisticRegression

    from llmclf import ngrams

    train, new = _topics(60, 1, labels), _topics(20, 2, labels)
    y = [labels.index(label) for label in train.labels]
    model = NgramModel.fit(train.texts, y, len(labels))
    x = _tfidf(ngram_counts(train.texts), model.idf.astype(np.float64))
    reference = LogisticRegression(C=ngrams.C, max_iter=2000).fit(x, y)
    expected = reference.predict_proba(_tfidf(ngram_counts(new.texts), model.idf.astype(np.float64)))
    np.testing.assert_allclose(np.exp(model.scores(new.texts)), expected, atol=1e-5)
    gold = np.array([labels.index(label) for label in new.labels])
    assert (model.scores(new.texts).argmax(1) == gold).mean() == 1.0


def test_the_weights_follow_the_better_model():
    train, val = _topics(60, 1), _topics(30, 2)
    y_val = [("money", "sport", "tech").index(label) for label in val.labels]
    model = NgramModel.fit(train.texts, [i % 3 for i in range(60)], 3)
    rng = np.random.default_rng(0)
    noise = rng.dirichlet(np.ones(3), size=30)  # a language model that knows nothing
    w_lm, w_ngram = model.fit_weights(noise, val.texts, y_val, prior=0.0).weights  # log-loss alone
    assert w_ngram > 1.0 and w_lm < 0.1
    assert (model.blend(noise, val.texts).argmax(1) == y_val).all()
    oracle = np.eye(3)[y_val] * 0.9 + 0.1 / 3  # a language model that is always right
    reversed_ngrams = NgramModel(model.idf, model.coef[[2, 0, 1]], model.intercept[[2, 0, 1]], model.weights)
    w_lm, w_ngram = reversed_ngrams.fit_weights(oracle, val.texts, y_val, prior=0.0).weights
    assert w_lm > w_ngram
    # The default pull toward equal weights: the shares move toward 1/2, and more so on fewer texts.
    pulled = reversed_ngrams.fit_weights(oracle, val.texts, y_val).weights
    assert 0.5 < pulled[0] / pulled.sum() < w_lm / (w_lm + w_ngram)
    log_oracle, scores = np.log(oracle), reversed_ngrams.scores(val.texts)
    more = fit_blend_weights([np.tile(log_oracle, (10, 1)), np.tile(scores, (10, 1))], y_val * 10)
    assert pulled[0] / pulled.sum() < more[0] / more.sum()


@pytest.fixture
def tiny_lm(tmp_path, tokenizer):
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "lm", GPTModel(GPTConfig(context_length=32, emb_dim=32, n_heads=4,
                                                                n_layers=2, drop_rate=0.1)), tokenizer)


def test_scratch_ensemble_trains_saves_reloads_and_refuses_a_missing_file(tmp_path: Path, tiny_lm: Path):
    train, val = _topics(48, 1), _topics(24, 2)
    clf = TextClassifier(str(tiny_lm), ensemble="tfidf", epochs=1, template=None, precision="float32")
    clf.fit(train, val, out_dir=tmp_path / "clf", progress=False)
    out = tmp_path / "clf"
    assert (out / NGRAMS_FILE).is_file()
    assert json.loads((out / "config.json").read_text())["training"]["ensemble"] == "tfidf"
    # the validation metrics are the ensemble's, as evaluate() gives them
    assert clf.val_metrics_["loss"] == pytest.approx(clf.evaluate(val)["loss"], rel=1e-5)
    new = _topics(12, 3).texts
    probs = clf.predict_proba(new)
    reloaded = load_classifier(out, precision="float32")
    np.testing.assert_allclose(reloaded.predict_proba(new), probs, atol=1e-6)
    lm_alone = reloaded._probabilities(new, 8, dropout=False)
    np.testing.assert_allclose(probs, reloaded._calibrated(reloaded.ngrams_.blend(lm_alone, new)), atol=1e-6)
    assert not np.allclose(probs, lm_alone, atol=1e-3)
    mc = reloaded.predict_mc_dropout(new, passes=3, seed=0)
    assert mc.mean.shape == (12, 3) and np.allclose(mc.mean.sum(axis=1), 1.0, atol=1e-5)

    arrays = load_file(str(out / NGRAMS_FILE))
    save_file({**arrays, "coef": arrays["coef"][:2]}, str(out / NGRAMS_FILE))
    with pytest.raises(ConfigError, match=r"'coef' should have shape \(3, "):
        load_classifier(out)
    (out / NGRAMS_FILE).unlink()
    with pytest.raises(ConfigError, match="ngrams.safetensors is missing.*--ensemble tfidf"):
        load_classifier(out)


def test_without_the_ensemble_nothing_changes(tmp_path: Path, tiny_lm: Path):
    clf = TextClassifier(str(tiny_lm), epochs=1, template=None, precision="float32", ensemble="none")
    clf.fit(_topics(24, 1), _topics(12, 2), out_dir=tmp_path / "clf", progress=False)
    assert clf.ngrams_ is None and not (tmp_path / "clf" / NGRAMS_FILE).exists()
    assert load_classifier(tmp_path / "clf").ngrams_ is None


def test_cli_takes_the_option_and_names_the_choices(tmp_path: Path, tiny_lm: Path):
    train, val = tmp_path / "train.csv", tmp_path / "val.csv"
    write_labelled(_topics(24, 1), train)
    write_labelled(_topics(12, 2), val)
    assert "--ensemble" in runner.invoke(app, ["train", "--help"]).output
    common = ["train", "--model", str(tiny_lm), "--train", str(train), "--val", str(val), "--epochs", "1",
              "--template", "{text}", "--precision", "float32"]
    result = runner.invoke(app, [*common, "--out", str(tmp_path / "bad"), "--ensemble", "bm25"])
    assert isinstance(result.exception, ConfigError)
    assert "--ensemble must be none, tfidf or tfidf+ENCODER" in str(result.exception)
    result = runner.invoke(app, [*common, "--out", str(tmp_path / "clf"), "--ensemble", "tfidf"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "clf" / NGRAMS_FILE).is_file()


def test_hf_engine_ensemble_saves_and_reloads(tmp_path: Path):
    from llmclf.engines.hf import HFClassifier
    from test_hf_engine import _reviews, _tiny_bert_dir

    bert = _tiny_bert_dir(tmp_path / "bert")
    train, val = _reviews(40, 1), _reviews(16, 2)
    clf = HFClassifier(str(bert), ensemble="tfidf", epochs=1, precision="float32")
    clf.fit(train, val, out_dir=tmp_path / "clf", progress=False)
    assert clf.val_metrics_["loss"] == pytest.approx(clf.evaluate(val)["loss"], rel=1e-5)
    new = _reviews(8, 3).texts
    reloaded = load_classifier(tmp_path / "clf")
    assert reloaded.ngrams_ is not None
    np.testing.assert_allclose(reloaded.predict_proba(new), clf.predict_proba(new), atol=1e-5)


def test_any_string_gets_scores():
    model = NgramModel.fit(_topics(30, 1).texts, [i % 3 for i in range(30)], 3)
    odd = ["", " ", "\x00", "\ud800 lone surrogate", "émoji 🙂", "a" * 20_000, "\r\n\t"]
    scores = model.scores(odd)
    assert scores.shape == (len(odd), 3) and np.isfinite(scores).all()


def test_mean_rule_averages_the_members_probabilities_and_survives_save_and_load(tmp_path: Path):
    train, new = _topics(30, 1), _topics(9, 2).texts
    model = NgramModel.fit(train.texts, [i % 3 for i in range(30)], 3)
    rng = np.random.default_rng(0)
    lm = rng.dirichlet(np.ones(3), size=len(new)).astype(np.float32)
    encoder = np.log(rng.dirichlet(np.ones(3), size=len(new)))
    model.weights, model.rule = np.ones(3, dtype=np.float32), "mean"
    expected = (lm + np.exp(model.scores(new)) + np.exp(encoder)) / 3
    np.testing.assert_allclose(model.combine(lm, model.scores(new), encoder), expected, atol=1e-6)
    model.save(tmp_path)
    reloaded = NgramModel.load(tmp_path, 3, members=3)
    assert reloaded.rule == "mean"
    np.testing.assert_allclose(reloaded.combine(lm, reloaded.scores(new), encoder), expected, atol=1e-6)
    # a file saved before the rule existed has no "blend" metadata: its weights are on log-probabilities
    arrays = load_file(str(tmp_path / NGRAMS_FILE))
    save_file(arrays, str(tmp_path / NGRAMS_FILE))
    old = NgramModel.load(tmp_path, 3, members=3)
    assert old.rule == "log" and not np.allclose(old.combine(lm, old.scores(new), encoder), expected, atol=1e-3)
    save_file(arrays, str(tmp_path / NGRAMS_FILE), metadata={"blend": "median"})
    with pytest.raises(ConfigError, match="blend rule 'median' is not one of log, mean"):
        NgramModel.load(tmp_path, 3, members=3)


def test_blend_mean_fits_no_weights_and_predicts_the_average(tmp_path: Path, tiny_lm: Path):
    train, val, new = _topics(48, 1), _topics(24, 2), _topics(12, 3).texts
    clf = TextClassifier(str(tiny_lm), ensemble="tfidf", blend="mean", epochs=1, template=None,
                         precision="float32", calibration="none")
    clf.fit(train, val, out_dir=tmp_path / "clf", progress=False)
    assert clf.ensemble_report_["weights"] == [1.0, 1.0] and "--blend mean" in clf.ensemble_report_["fitted_on"]
    lm = clf._probabilities(new, 8, dropout=False)
    expected = (lm + np.exp(clf.ngrams_.scores(new))) / 2
    np.testing.assert_allclose(clf.predict_proba(new), expected, atol=1e-6)
    reloaded = load_classifier(tmp_path / "clf", precision="float32")
    assert json.loads((tmp_path / "clf" / "config.json").read_text())["training"]["blend"] == "mean"
    np.testing.assert_allclose(reloaded.predict_proba(new), expected, atol=1e-6)
