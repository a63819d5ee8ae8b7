"""Calibrated probabilities and decision thresholds, fitted on the validation set after training.

Temperature scaling (Guo et al. 2017): one scalar T > 0 for the whole classifier (after any
n-gram blend), p_cal = softmax(log p / T), T chosen by log-loss on validation. It never changes
the arg-max, so accuracy stays; it only makes the probabilities mean what they say.

A decision threshold (binary only): predict the positive class when its calibrated probability
reaches t, with t chosen on validation for a metric: `f1`, `precision@R` (the highest recall whose
precision is at least R) or `recall@P` (the highest precision whose recall is at least P).

`calibration_scores` measures calibration: log-loss, Brier score and the expected calibration error.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import log_softmax

from llmclf.errors import ConfigError

CALIBRATIONS = ("temperature", "none")
TEMPERATURE_RANGE = (0.05, 20.0)  # beyond these the validation set says more about itself than the model
# A weak pull of log T toward 0 (T = 1), worth this many texts: mean log-loss + (prior / N) * (log T)^2. A
# validation set the model classifies without error would otherwise send T to its lower bound (NLL falls as
# T -> 0 while nothing is wrong), making every probability 0 or 1.
TEMPERATURE_PRIOR = 1.0
ECE_BINS = 15  # equal-width confidence bins, as Guo et al.


def _log_probs(probs: np.ndarray) -> np.ndarray:
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T), rows of `probs` (N, classes); T = 1 gives `probs` back unchanged."""
    if temperature == 1.0 or len(probs) == 0:
        return probs
    return np.exp(log_softmax(_log_probs(probs) / temperature, axis=1)).astype(np.float32)


def nll(probs: np.ndarray, labels: np.ndarray | list[int]) -> float:
    """Mean negative log-likelihood of the true labels (natural log; probabilities clipped at 1e-12)."""
    y = np.asarray(labels)
    return float(-_log_probs(probs)[np.arange(len(y)), y].mean()) if len(y) else float("nan")


def fit_temperature(probs: np.ndarray, labels: np.ndarray | list[int], prior: float = TEMPERATURE_PRIOR) -> float:
    """The T in `TEMPERATURE_RANGE` that minimises the log-loss of `apply_temperature(probs, T)` on
    these (held-out) labels, plus (prior / N) (log T)^2 (see `TEMPERATURE_PRIOR`); one dimension,
    solved by bounded Brent on log T."""
    from scipy.optimize import minimize_scalar

    log_p, y = _log_probs(probs), np.asarray(labels)
    if len(y) == 0:
        return 1.0

    def loss(log_t: float) -> float:
        nll_t = -log_softmax(log_p / math.exp(log_t), axis=1)[np.arange(len(y)), y].mean()
        return float(nll_t + prior / len(y) * log_t ** 2)

    lo, hi = (math.log(t) for t in TEMPERATURE_RANGE)
    result = minimize_scalar(loss, bounds=(lo, hi), method="bounded", options={"xatol": 1e-4})
    t = float(math.exp(result.x))
    return t if loss(math.log(t)) < loss(0.0) else 1.0  # never worse than leaving the probabilities alone


# --- measuring calibration ------------------------------------------------------------------------

def brier_score(probs: np.ndarray, labels: np.ndarray | list[int]) -> float:
    """Mean over texts of the sum over classes of (p - one-hot)^2 (Brier's original multi-class form; for two
    classes it is twice scikit-learn's `brier_score_loss` of the positive class)."""
    probs, y = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    if len(y) == 0:
        return float("nan")
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(y)), y] = 1.0
    return float(((probs - onehot) ** 2).sum(axis=1).mean())


def reliability_bins(probs: np.ndarray, labels: np.ndarray | list[int], bins: int = ECE_BINS):
    """Top-label reliability: per equal-width confidence bin on (0, 1], (count, mean confidence,
    accuracy) of the texts whose highest probability falls in it (empty bins: count 0, NaNs)."""
    probs, y = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    confidence, correct = probs.max(axis=1), (probs.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)  # (lo, hi] bins
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, confidence, minlength=bins) / count
        accuracy = np.bincount(which, correct, minlength=bins) / count
    return count, mean_conf, accuracy


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray | list[int], bins: int = ECE_BINS) -> float:
    """Top-label ECE: sum over `bins` equal-width confidence bins of (texts in bin / n) x |accuracy -
    mean confidence| (Guo et al. 2017's definition, 15 bins)."""
    count, conf, acc = reliability_bins(probs, labels, bins)
    n = count.sum()
    if n == 0:
        return float("nan")
    used = count > 0
    return float((count[used] / n * np.abs(acc[used] - conf[used])).sum())


def calibration_scores(probs: np.ndarray, labels: np.ndarray | list[int]) -> dict[str, float]:
    """`log_loss`, `brier` and `ece` (see the functions above) of probabilities against true label ids."""
    return {"log_loss": nll(probs, labels), "brier": brier_score(probs, labels),
            "ece": expected_calibration_error(probs, labels)}


# --- decision thresholds (binary) -------------------------------------------------------------------

@dataclass(frozen=True)
class ThresholdMetric:
    """A parsed `--tune-threshold`: `f1`, or `precision`/`recall` with the floor `at` of that metric."""

    kind: str  # f1 | precision | recall
    at: float | None = None

    @classmethod
    def parse(cls, spec: str) -> ThresholdMetric:
        if spec == "f1":
            return cls("f1")
        m = re.fullmatch(r"(precision|recall)@([0-9]*\.?[0-9]+)", spec or "")
        if m and 0.0 < float(m.group(2)) <= 1.0:
            return cls(m.group(1), float(m.group(2)))
        raise ConfigError(f"--tune-threshold {spec!r}: use f1, precision@R (e.g. precision@0.95: the highest recall "
                          "with precision at least 0.95) or recall@P (the highest precision with recall at least P), "
                          "R and P in (0, 1]")

    def __str__(self) -> str:
        return self.kind if self.at is None else f"{self.kind}@{self.at:g}"


def threshold_problem(spec: str | None) -> str | None:
    """`TrainArgs`'s check of `--tune-threshold`."""
    if spec is None:
        return None
    try:
        ThresholdMetric.parse(spec)
    except ConfigError:
        return f"must be f1, precision@R or recall@P (R, P in (0, 1], e.g. precision@0.95), got {spec!r}"
    return None


def tune_threshold(p_positive: np.ndarray, is_positive: np.ndarray, spec: str) -> tuple[float | None, dict[str, Any]]:
    """The decision threshold on `p_positive` (the positive class's probability per validation text)
    for metric `spec`, and what it achieves there (precision, recall, f1). Thresholds lie halfway
    between consecutive distinct probabilities, so a text whose probability equals none of them is
    decided the same way by the validation set and by new data. None when no threshold reaches the
    floor of `precision@R` / `recall@P` (the report says which was the best reachable)."""
    metric = ThresholdMetric.parse(spec)
    p, pos = np.asarray(p_positive, dtype=np.float64), np.asarray(is_positive, dtype=bool)
    values = np.unique(p)  # ascending
    candidates = np.concatenate([[values[0] / 2], (values[1:] + values[:-1]) / 2, [(values[-1] + 1.0) / 2]])
    # Predicting positive when p >= t, for every candidate t (vectorised: texts x thresholds).
    predicted = p[:, None] >= candidates[None, :]
    tp = (predicted & pos[:, None]).sum(axis=0).astype(np.float64)
    fp = (predicted & ~pos[:, None]).sum(axis=0)
    n_pos = pos.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 1.0)  # no positive prediction: no false alarm
        recall = tp / n_pos if n_pos else np.zeros_like(tp)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    if metric.kind == "f1":
        ok, score, tie = np.ones_like(f1, dtype=bool), f1, precision
    elif metric.kind == "precision":  # (predicting no text positive is not a way to be precise)
        ok, score, tie = (precision >= metric.at) & (tp > 0), recall, precision
    else:
        ok, score, tie = recall >= metric.at, precision, recall
    report: dict[str, Any] = {"metric": str(metric)}
    if not ok.any():
        best = int(np.argmax(precision if metric.kind == "precision" else recall))
        report.update(reachable=False, best_reachable={"precision": float(precision[best]),
                                                       "recall": float(recall[best])})
        return None, report
    # The best score, then the better other metric, then the middle of the tied thresholds.
    key = np.where(ok, score, -np.inf)
    best_score = key.max()
    tied = np.flatnonzero(np.isclose(key, best_score) & ok)
    tied = tied[np.isclose(tie[tied], tie[tied].max())]
    best = int(tied[len(tied) // 2])
    report.update(reachable=True, precision=float(precision[best]), recall=float(recall[best]), f1=float(f1[best]))
    return float(candidates[best]), report


@dataclass(frozen=True)
class DecisionThreshold:
    """Binary decisions by threshold: the label is `classes[positive]` when its probability reaches
    `threshold`, else the other class."""

    positive: int
    threshold: float

    def label_ids(self, probs: np.ndarray) -> np.ndarray:
        probs = np.asarray(probs)
        return np.where(probs[:, self.positive] >= self.threshold, self.positive, 1 - self.positive)


def decide(probs: np.ndarray, decision: DecisionThreshold | None) -> np.ndarray:
    """Label ids of rows of `probs`: the arg-max, or by the decision threshold when there is one."""
    probs = np.asarray(probs)
    if decision is None or len(probs) == 0:
        return probs.argmax(axis=1) if probs.ndim == 2 else np.zeros(0, dtype=np.int64)
    return decision.label_ids(probs)
