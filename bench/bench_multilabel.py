"""Multi-label classification on real text: AG News titles, alone or two of different topics joined.

The set (`llmclf.data.classification.ag_news_multilabel`, from ../shared/data/ag_news/test.csv): N texts, each a
news title labelled with its topic (World, Sports, Business, Sci/Tech) or, for 40 % of them, two titles
of different topics joined by " / " and labelled with both. Split by iterative stratification
(`llmclf data split --stratify --label-sep ,`: 60 / 15 / 25 %), written as CSV files (labels joined by ",").

Compared, each scored once on the test part with thresholds tuned per label on the validation part:
- TF-IDF word 1-2-grams + char 2-5-grams, one-vs-rest logistic regression (scikit-learn), the baseline;
- `llmclf train --label-sep ,` with the default backbone and recipe (scratch engine, gemma3-270m, head on
  cached features);
- with --hf, the hf engine's default (all-MiniLM-L6-v2, fully fine-tuned, 3 epochs).

    python bench/bench_multilabel.py [--n 1400] [--hf] [--no-scratch] [--out runs/multilabel] [--json F]

Timings are wall seconds on this machine (print the CPU with `lscpu`; a shared machine's are noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from llmclf.data.classification import ag_news_multilabel, read_labelled, split_labelled, write_labelled
from llmclf.multilabel import multi_hot, multilabel_metrics, tune_thresholds

KEYS = ("micro_f1", "macro_f1", "samples_f1", "subset_accuracy", "hamming_loss")


def tfidf_one_vs_rest(train, val, test, classes):
    """One logistic regression per label on TF-IDF word and character n-grams; thresholds tuned on val."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline, make_union

    def y(data):
        return multi_hot([label.split(data.label_sep) for label in data.labels], classes)

    start = time.perf_counter()
    features = make_union(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1),
                          TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2))
    model = make_pipeline(features, OneVsRestClassifier(LogisticRegression(C=10.0, max_iter=2000)))
    model.fit(train.texts, y(train))
    thresholds = tune_thresholds(model.predict_proba(val.texts), y(val))
    metrics = multilabel_metrics(y(test), model.predict_proba(test.texts), classes, thresholds)
    return metrics, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", default=os.environ.get("LLMCLF_SHARED", "../shared"))
    parser.add_argument("--n", type=int, default=1400)
    parser.add_argument("--model", default=None, help="scratch backbone (default: llmclf's default)")
    parser.add_argument("--hf", action="store_true", help="also the hf engine's default (all-MiniLM-L6-v2)")
    parser.add_argument("--no-scratch", action="store_true", help="leave out the scratch engine's default (with "
                        "--hf: TF-IDF and MiniLM only)")
    parser.add_argument("--out", default="runs/multilabel")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from llmclf.classifier import HFClassifier, TextClassifier
    from llmclf.config import DEFAULT_BACKBONE

    out = Path(args.out)
    data = ag_news_multilabel(Path(args.shared) / "data" / "ag_news" / "test.csv", n=args.n)
    parts = split_labelled(data, (0.6, 0.15, 0.25), stratify=True, seed=123)
    for name, part in zip(("train", "validation", "test"), parts, strict=True):
        write_labelled(part, out / "data" / f"{name}.csv")
    train, val, test = (read_labelled(out / "data" / f"{name}.csv", label_sep=",")
                        for name in ("train", "validation", "test"))
    classes = sorted({name for label in train.labels for name in label.split(",")})
    pairs = sum("," in label for label in data.labels)
    print(f"AG News multi-label: {len(data)} texts ({pairs} with two labels), train {len(train)}, validation "
          f"{len(val)}, test {len(test)}; labels {', '.join(classes)}")

    results = {}
    metrics, seconds = tfidf_one_vs_rest(train, val, test, classes)
    results["tfidf-ovr-logreg"] = {**{k: metrics[k] for k in KEYS}, "seconds": round(seconds, 1),
                                   "per_class": metrics["per_class"]}
    print("tfidf-ovr-logreg", json.dumps(results["tfidf-ovr-logreg"]), flush=True)
    runs = [] if args.no_scratch else [("scratch " + (args.model or DEFAULT_BACKBONE),
                                        TextClassifier(args.model or DEFAULT_BACKBONE))]
    if args.hf:
        runs.append(("hf all-minilm-l6-v2", HFClassifier("all-minilm-l6-v2")))
    for name, clf in runs:
        clf.set_params(label_sep=",")
        start = time.perf_counter()
        clf.fit(train, val, out_dir=out / name.split()[0], progress=False)
        seconds = time.perf_counter() - start
        metrics = clf.evaluate(test)
        results[name] = {**{k: metrics[k] for k in KEYS}, "seconds": round(seconds, 1),
                         "thresholds": metrics["thresholds"], "per_class": metrics["per_class"]}
        print(name, json.dumps(results[name]), flush=True)

    print(f"{'model':28s} {'micro-F1':>9s} {'macro-F1':>9s} {'samples-F1':>10s} {'subset acc':>10s} "
          f"{'Hamming':>8s} {'train s':>8s}")
    for name, r in results.items():
        print(f"{name:28s} {r['micro_f1']:9.4f} {r['macro_f1']:9.4f} {r['samples_f1']:10.4f} "
              f"{r['subset_accuracy']:10.4f} {r['hamming_loss']:8.4f} {r['seconds']:8.1f}")
        print("    per label F1: " + ", ".join(f"{c} {m['f1']:.3f}" for c, m in r["per_class"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"n": len(data), "pairs": pairs, "results": results}, indent=1))


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
