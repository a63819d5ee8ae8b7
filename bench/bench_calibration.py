"""Calibration, decision thresholds and blend weights of llmclf's default recipe, measured on one data set.

Trains one classifier (default recipe: head on cached frozen features, mean pooling, TF-IDF ensemble
with blend weights on out-of-fold predictions, temperature scaling), then prints from the same
probabilities:

- the blend: weights fitted on out-of-fold predictions + validation vs on validation alone, the
  validation accuracy of the language model alone, the n-grams alone and the blend, and the seconds
  the ensemble fit took (the out-of-fold head and n-gram refits included);
- test accuracy, log-loss, Brier score and ECE (top label, 15 bins) before and after the temperature,
  for the out-of-fold weights and for the validation-only weights (each with its own temperature);
- with --tune-threshold (binary data), the tuned threshold and test precision/recall/F1 at it vs at 0.5.

    python bench/bench_calibration.py --data runs/sms --model smollm2-135m
    python bench/bench_calibration.py --ag-news /work/shared/data/ag_news/test.csv --data runs/ag1200

`--ag-news FILE` first writes a stratified 1,200 / 300 / 1,000 train / validation / test split of AG
News (class,title,description, no header; text = title + ". " + description) into --data.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import time
from pathlib import Path

import numpy as np

from llmclf.classifier import TextClassifier
from llmclf.data.classification import LabelledTexts, read_labelled, write_labelled
from llmclf.training.calibration import apply_temperature, calibration_scores, decide, fit_temperature

AG_NEWS_CLASSES = {"1": "World", "2": "Sports", "3": "Business", "4": "Sci/Tech"}


def prepare_ag_news(source: Path, out: Path, seed: int = 123) -> None:
    from sklearn.model_selection import train_test_split

    with open(source, newline="", encoding="utf-8") as f:
        rows = [(f"{title}. {description}".replace("\\", " "), AG_NEWS_CLASSES[label])
                for label, title, description in csv.reader(f)]
    texts, labels = [r[0] for r in rows], [r[1] for r in rows]
    rest_t, test_t, rest_y, test_y = train_test_split(texts, labels, test_size=1000, stratify=labels,
                                                      random_state=seed)
    train_t, other_t, train_y, other_y = train_test_split(rest_t, rest_y, train_size=1200, stratify=rest_y,
                                                          random_state=seed)
    val_t, _, val_y, _ = train_test_split(other_t, other_y, train_size=300, stratify=other_y, random_state=seed)
    out.mkdir(parents=True, exist_ok=True)
    for name, t, y in (("train", train_t, train_y), ("validation", val_t, val_y), ("test", test_t, test_y)):
        write_labelled(LabelledTexts(t, y, name), out / f"{name}.csv")


def scores_row(name: str, probs: np.ndarray, y: np.ndarray, decision=None) -> str:
    s = calibration_scores(probs, y)
    acc = float((decide(probs, decision) == y).mean())
    return f"  {name:34s} accuracy {acc:.4f}  log-loss {s['log_loss']:.4f}  Brier {s['brier']:.4f}  ECE {s['ece']:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="directory with train/validation/test.csv")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ag-news", type=Path, help="write the AG News split into --data first")
    parser.add_argument("--tune-threshold", default=None, help="e.g. f1 or precision@0.95 (binary data)")
    parser.add_argument("--out", type=Path, default=None, help="save the model here")
    args = parser.parse_args()
    if args.ag_news is not None:
        prepare_ag_news(args.ag_news, args.data)
    data = {name: read_labelled(args.data / f"{name}.csv") for name in ("train", "validation", "test")}
    print(f"{platform.processor() or platform.machine()}; {args.model}; {args.data}: "
          + ", ".join(f"{k} {len(v)}" for k, v in data.items()))

    start = time.perf_counter()
    clf = TextClassifier(args.model, tune_threshold=args.tune_threshold, log_every=10_000)
    clf.fit(data["train"], data["validation"], out_dir=args.out, progress=False)
    print(f"trained in {time.perf_counter() - start:.1f} s (fit's own count: {clf.train_seconds_:.1f} s before the "
          "blend and calibration)")
    ens, cal = clf.ensemble_report_, clf.calibration_report_
    print(f"ensemble fitted in {ens['seconds']:.1f} s on {ens['fitted_on']}")
    print(f"  weights (language model, n-grams): out-of-fold + validation {ens['weights'][0]:.3f}, "
          f"{ens['weights'][1]:.3f}; validation only {ens['weights_validation_only'][0]:.3f}, "
          f"{ens['weights_validation_only'][1]:.3f}")
    acc = ens["validation_accuracy"]
    print(f"  validation accuracy: language model {acc['language_model']:.4f}, n-grams {acc['ngrams']:.4f}, "
          f"blend {acc['blend']:.4f}")
    print(f"temperature {cal['temperature']:.4f}; validation log-loss {cal['validation_before']['log_loss']:.4f} -> "
          f"{cal['validation_after']['log_loss']:.4f}, ECE {cal['validation_before']['ece']:.4f} -> "
          f"{cal['validation_after']['ece']:.4f}")

    index = {label: i for i, label in enumerate(clf.classes_)}
    y_val = np.array([index[label] for label in data["validation"].labels])
    y_test = np.array([index[label] for label in data["test"].labels])
    lm_val = clf._probabilities(data["validation"].texts, 32, dropout=False)
    lm_test = clf._probabilities(data["test"].texts, 32, dropout=False)
    ngrams = clf.ngrams_
    s_val, s_test = ngrams.scores(data["validation"].texts), ngrams.scores(data["test"].texts)
    oof_weights = ngrams.weights.copy()
    print("test set:")
    for name, weights in (("out-of-fold weights", oof_weights),
                          ("validation-only weights", np.array(ens["weights_validation_only"], dtype=np.float32))):
        ngrams.weights = weights
        blend_val, blend_test = ngrams.combine(lm_val, s_val), ngrams.combine(lm_test, s_test)
        t = fit_temperature(blend_val, y_val)
        print(scores_row(f"{name}, before temperature", blend_test, y_test))
        print(scores_row(f"{name}, after (T = {t:.3f})", apply_temperature(blend_test, t), y_test))
    ngrams.weights = oof_weights
    print(scores_row("language model alone (T = 1)", lm_test, y_test))
    print(scores_row("n-grams alone", np.exp(s_test), y_test))
    if clf.decision is not None:
        from sklearn.metrics import precision_recall_fscore_support

        probs = clf.predict_proba(data["test"].texts)
        pos = clf.decision.positive
        for name, decision in ((f"threshold {clf.decision.threshold:.4f}", clf.decision), ("arg-max", None)):
            p, r, f, _ = precision_recall_fscore_support(y_test == pos, decide(probs, decision) == pos,
                                                         average="binary", zero_division=0)
            print(f"  test {clf.classes_[pos]} at {name}: precision {p:.4f}  recall {r:.4f}  F1 {f:.4f}")
    print(json.dumps({"ensemble": ens, "calibration": cal, "decision_threshold": clf.threshold_report_}))


if __name__ == "__main__":
    main()
