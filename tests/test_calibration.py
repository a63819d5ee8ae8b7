"""Calibrated probabilities and decision thresholds (llmclf.training.calibration) and their place in
training, saving, evaluate, predict and the blend weights of the n-gram ensemble."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from llmclf.classifier import evaluation_report, load_classifier
from llmclf.cli import app
from llmclf.config import GPTConfig
from llmclf.data.classification import LabelledTexts, write_labelled
from llmclf.engines.base import prediction_record
from llmclf.engines.scratch import TextClassifier
from llmclf.errors import ConfigError
from llmclf.loaders.checkpoint import save_checkpoint
from llmclf.models.gpt2 import GPTModel
from llmclf.training.calibration import (
    DecisionThreshold,
    apply_temperature,
    brier_score,
    calibration_scores,
    expected_calibration_error,
    fit_temperature,
    nll,
    tune_threshold,
)
from tiny_classifier import NEGATIVE, POSITIVE, tiny_classifier_dir, toy_data

runner = CliRunner()


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _over_confident(n: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z), probabilities reported as softmax(3 z): right on average, too sure."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.0, size=(n, 3))
    y = np.array([rng.choice(3, p=p) for p in _softmax(z)])
    return _softmax(3.0 * z), y


# --- temperature ------------------------------------------------------------------------------------

def test_temperature_undoes_over_confidence_and_keeps_the_argmax():
    probs, y = _over_confident()
    t = fit_temperature(probs, y)
    assert t == pytest.approx(3.0, rel=0.15)  # the factor the toy sharpened by
    calibrated = apply_temperature(probs, t)
    assert nll(calibrated, y) < nll(probs, y) - 0.1
    assert expected_calibration_error(calibrated, y) < expected_calibration_error(probs, y) / 2
    assert (calibrated.argmax(axis=1) == probs.argmax(axis=1)).all()
    np.testing.assert_allclose(calibrated.sum(axis=1), 1.0, atol=1e-5)
    assert apply_temperature(probs, 1.0) is probs


def test_a_flawless_validation_set_does_not_push_the_temperature_to_its_bound():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])
    assert 0.5 < fit_temperature(probs, [0, 1, 0]) < 1.0  # sharper, but not 0/1 probabilities


# --- measuring calibration --------------------------------------------------------------------------

def test_log_loss_and_brier_match_scikit_learn_and_ece_matches_a_hand_computation():
    from sklearn.metrics import brier_score_loss, log_loss

    probs = np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4], [0.2, 0.8]])
    y = np.array([0, 1, 1, 1])
    scores = calibration_scores(probs, y)
    assert scores["log_loss"] == pytest.approx(log_loss(y, probs))
    assert scores["brier"] == pytest.approx(2 * brier_score_loss(y, probs[:, 1]))  # both classes' squared errors
    multi = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    assert brier_score(multi, [0, 1]) == pytest.approx((0.09 + 0.04 + 0.01 + 0.01 + 0.81 + 0.64) / 2)
    # top-label confidences 0.9, 0.7, 0.6, 0.8 in bins of width 1/15; right, right, wrong, right
    # each text alone in its bin: ECE = mean |correct - confidence| = (0.1 + 0.3 + 0.6 + 0.2) / 4
    assert scores["ece"] == pytest.approx((0.1 + 0.3 + 0.6 + 0.2) / 4)
    # two texts in one bin (0.82 and 0.83, one right): |0.5 - 0.825| for both
    assert expected_calibration_error(np.array([[0.82, 0.18], [0.83, 0.17]]), [0, 1]) == pytest.approx(0.325)
    # bins are (lo, hi]: 0.8 = 12/15 ends a bin, 0.81 starts the next
    assert expected_calibration_error(np.array([[0.8, 0.2], [0.81, 0.19]]), [0, 1]) == pytest.approx(0.505)


def test_the_ece_of_perfectly_calibrated_probabilities_is_about_zero():
    rng = np.random.default_rng(1)
    confidence = rng.uniform(0.5, 1.0, size=200_000)
    right = rng.uniform(size=confidence.size) < confidence  # right exactly as often as it says
    probs = np.stack([confidence, 1 - confidence], axis=1)
    assert expected_calibration_error(probs, np.where(right, 0, 1)) < 0.005
    always_right = np.zeros(confidence.size, dtype=int)
    assert expected_calibration_error(probs, always_right) > 0.2  # under-confident


# --- decision thresholds ----------------------------------------------------------------------------

# p(positive) and truth of ten validation texts, ascending
P = np.array([0.05, 0.10, 0.20, 0.30, 0.40, 0.55, 0.60, 0.70, 0.80, 0.95])
POS = np.array([0, 0, 1, 0, 1, 0, 1, 1, 1, 1], dtype=bool)


def test_the_threshold_is_chosen_for_the_metric():
    # F1 peaks when everything from 0.20 up is positive: tp 6, fp 2 (0.30, 0.55), recall 1
    t, report = tune_threshold(P, POS, "f1")
    assert 0.10 < t < 0.20 and t == pytest.approx(0.15)  # halfway between the neighbouring probabilities
    assert report["f1"] == pytest.approx(2 * 6 / (2 * 6 + 2)) and report["recall"] == 1.0
    # precision >= 0.95: only texts 0.60 and up (4 of them, all positive): recall 4/6
    t, report = tune_threshold(P, POS, "precision@0.95")
    assert 0.55 < t < 0.60 and report["precision"] == 1.0 and report["recall"] == pytest.approx(4 / 6)
    # recall >= 0.8 (5 of 6 positives): from 0.40 up gives precision 5/6, the best
    t, report = tune_threshold(P, POS, "recall@0.8")
    assert 0.30 < t < 0.40 and report["precision"] == pytest.approx(5 / 6)
    t, report = tune_threshold(P, np.zeros(10, dtype=bool), "precision@0.5")  # no positives: nothing reaches it
    assert t is None and not report["reachable"]
    decision = DecisionThreshold(positive=1, threshold=0.15)
    assert decision.label_ids(np.stack([1 - P, P], axis=1)).tolist() == [0, 0] + [1] * 8
    with pytest.raises(ConfigError, match="precision@R"):
        tune_threshold(P, POS, "precision@1.5")


def test_the_prediction_record_follows_and_shows_the_threshold():
    record = prediction_record(["ham", "spam"], [0.7, 0.3], decision=DecisionThreshold(1, 0.25))
    assert record["label"] == "spam" and record["decision_threshold"] == {"label": "spam", "threshold": 0.25}
    assert prediction_record(["ham", "spam"], [0.7, 0.3])["label"] == "ham"


# --- in training, saving and the commands ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory, tokenizer) -> Path:
    """A tiny random GPT-2 without dropout: its frozen layers are cached, so the head is refit on folds."""
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("lm") / "lm", GPTModel(GPTConfig(
        context_length=32, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)), tokenizer)


@pytest.fixture(scope="module")
def fitted(tiny_lm: Path, tmp_path_factory) -> tuple[TextClassifier, Path]:
    out = tmp_path_factory.mktemp("calibrated") / "clf"
    train, val = toy_data(40), toy_data(24, offset=100, pos_every=3)
    clf = TextClassifier(str(tiny_lm), epochs=2, template=None, precision="float32", tune_threshold="f1",
                         ensemble_folds=2, log_every=1000)
    clf.fit(train, val, out_dir=out, progress=False)
    return clf, out


def test_fit_saves_the_temperature_threshold_and_blend_report(fitted):
    clf, out = fitted
    config = json.loads((out / "config.json").read_text())
    assert config["calibration"] == {"method": "temperature", "temperature": clf.temperature_}
    assert clf.decision is not None and config["decision_threshold"]["label"] == "pos"
    assert config["decision_threshold"]["threshold"] == clf.decision.threshold
    metrics = config["metrics"]
    assert metrics["calibration"]["validation_after"]["log_loss"] <= metrics["calibration"]["validation_before"][
        "log_loss"]
    assert metrics["ensemble"]["fitted_on"].startswith("out-of-fold predictions of 2 folds")
    assert set(metrics["ensemble"]["validation_accuracy"]) == {"language_model", "ngrams", "encoder", "blend"}
    assert {"log_loss", "brier", "ece"} <= set(metrics["validation"])
    reloaded = load_classifier(out, precision="float32")
    assert reloaded.temperature_ == clf.temperature_ and reloaded.decision == clf.decision
    texts = [POSITIVE, NEGATIVE, "item 7: wonderful"]
    np.testing.assert_allclose(reloaded.predict_proba(texts), clf.predict_proba(texts), atol=1e-6)
    assert reloaded.info()["decision_threshold"]["threshold"] == clf.decision.threshold


def test_the_same_seed_gives_the_same_blend_and_calibration(fitted, tiny_lm: Path):
    clf, _ = fitted
    again = TextClassifier(str(tiny_lm), epochs=2, template=None, precision="float32", tune_threshold="f1",
                           ensemble_folds=2, log_every=1000)
    again.fit(toy_data(40), toy_data(24, offset=100, pos_every=3), progress=False)
    assert again.ensemble_report_["weights"] == clf.ensemble_report_["weights"]
    assert again.temperature_ == clf.temperature_ and again.decision == clf.decision


def test_out_of_fold_weights_differ_from_validation_only_ones(tiny_lm: Path):
    """The language model is poor on the validation texts but right out of fold on the training texts:
    fitted on both, the blend trusts it more than the validation set alone would."""
    rng = np.random.default_rng(0)
    words = "red green blue old new big small".split()

    def noise(n: int, offset: int) -> LabelledTexts:  # labels the words say nothing about
        return LabelledTexts([f"note {i + offset}: {rng.choice(words)} {rng.choice(words)}" for i in range(n)],
                             [str(rng.choice(["neg", "pos"])) for _ in range(n)], "noise")

    train, val = noise(40, 0), noise(30, 100)
    clf = TextClassifier(str(tiny_lm), ensemble="tfidf", ensemble_folds=2)
    clf.classes_ = ["neg", "pos"]
    y_train = np.array(clf._label_ids(train))
    val_probs = rng.dirichlet(np.ones(2), size=len(val))  # no better than the n-grams on the validation texts

    def refit_head(fold: int, fit: list[int], held: list[int]) -> np.ndarray:
        return np.eye(2)[y_train[held]] * 0.98 + 0.01

    clf._fit_ensemble(train, val, val_probs, refit_head)
    report = clf.ensemble_report_
    oof, val_only = report["weights"], report["weights_validation_only"]
    assert report["fitted_on"].startswith("out-of-fold predictions of 2 folds")
    assert oof[0] / sum(oof) > 0.6 and oof[0] > val_only[0] + 0.5  # the validation set alone: both near 0
    clf.ensemble_folds = 0
    clf._fit_ensemble(train, val, val_probs, refit_head)
    assert clf.ensemble_report_["weights"] == val_only and "--ensemble-folds 0" in clf.ensemble_report_["fitted_on"]


def test_a_threshold_on_more_than_two_classes_is_a_clear_error(tiny_lm: Path, tmp_path: Path):
    three = LabelledTexts(["a", "b", "c", "d", "e", "f"], ["x", "y", "z"] * 2, "three.csv")
    with pytest.raises(ConfigError, match=r"--tune-threshold f1: decision thresholds are for two classes.*3"):
        TextClassifier(str(tiny_lm), tune_threshold="f1").fit(three, three, progress=False)
    with pytest.raises(ConfigError, match="--tune-threshold must be f1, precision@R or recall@P.*'precision'"):
        TextClassifier(str(tiny_lm), tune_threshold="precision").fit(three, three, progress=False)
    write_labelled(three, tmp_path / "three.csv")
    result = runner.invoke(app, ["train", "--model", str(tiny_lm), "--train", str(tmp_path / "three.csv"), "--val",
                                 str(tmp_path / "three.csv"), "--out", str(tmp_path / "out"), "--tune-threshold",
                                 "recall@0.9"])
    assert isinstance(result.exception, ConfigError)
    assert "decision thresholds are for two classes" in str(result.exception)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_dir: Path) -> Path:
    return tiny_classifier_dir(tmp_path_factory, shared_dir)


def test_evaluate_reports_calibration_and_draws_the_reliability_diagram(trained: Path, tmp_path: Path):
    clf = load_classifier(trained, precision="float32")
    data = toy_data(12, offset=50)
    metrics = evaluation_report(clf, data, plots_dir=tmp_path)
    assert (tmp_path / "calibration.png").stat().st_size > 1000 and (tmp_path / "confusion_matrix.png").is_file()
    probs = clf.predict_proba(data.texts)
    y = clf._label_ids(data)
    assert metrics["log_loss"] == pytest.approx(nll(probs, y)) == pytest.approx(metrics["loss"])
    assert metrics["brier"] == pytest.approx(brier_score(probs, y))
    assert metrics["ece"] == pytest.approx(expected_calibration_error(probs, y))
    assert sum(metrics["reliability"]["count"]) == 12 and metrics["reliability"]["bins"] == 15
    write_labelled(data, tmp_path / "data.csv")
    result = runner.invoke(app, ["evaluate", "--model", str(trained), "--data", str(tmp_path / "data.csv"), "--json"])
    assert result.exit_code == 0, result.output
    assert {"log_loss", "brier", "ece"} <= set(json.loads(result.output))
    result = runner.invoke(app, ["evaluate", "--model", str(trained), "--data", str(tmp_path / "data.csv")])
    assert "ECE" in result.output and "Brier" in result.output


def test_predicts_label_follows_the_decision_threshold(trained: Path):
    clf = load_classifier(trained, precision="float32")
    texts = [POSITIVE, NEGATIVE]
    p_pos = clf.predict_proba(texts)[:, 1]
    assert p_pos[0] > p_pos[1]
    between = float(p_pos.mean())
    clf.set_decision_threshold(float(p_pos.max()) + 1e-6)  # above both: neither is pos
    assert clf.predict(texts) == ["neg", "neg"]
    clf.set_decision_threshold(float(p_pos.min()) - 1e-6)  # below both: both are pos
    assert clf.predict(texts) == ["pos", "pos"]
    result = runner.invoke(app, ["predict", "--model", str(trained), "--decision-threshold", "0", "--json", NEGATIVE])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert record["label"] == "pos" and record["decision_threshold"] == {"label": "pos", "threshold": 0.0}
    result = runner.invoke(app, ["predict", "--model", str(trained), "--decision-threshold", str(between), POSITIVE,
                                 NEGATIVE])
    assert result.exit_code == 0, result.output
    assert [line.split("\t")[0] for line in result.stdout.strip().splitlines()[-2:]] == ["pos", "neg"]
    assert f"decision: pos when p(pos) >= {between:.4f}" in result.output
