"""Long documents: IMDB full reviews, truncated to 128 / 256 / 512 tokens vs every window classified.

IMDB (`data/imdb/imdb_train_1000_balanced.csv`), split (seeded, stratified, as `bench_robustness.py`)
into train / validation / test. Each setting trains the default backbone the way `llmclf train` does
by default (Gemma 3 270M, template auto, a head on the mean of its frozen states, 7 epochs, lr 1e-3,
temperature calibration) but without the TF-IDF blend (`ensemble="none"`), to isolate the language
model's reading of the text:

- `truncate:N`: `--max-length N` (the template's end kept, the review's end cut);
- `chunk:LEN:STRIDE`: `--long-text chunk:LEN:STRIDE`. Every window is a training example with its review's
  label, so the trained head is the same for every `--aggregate`: one training, then the test windows are
  classified once (`llmclf.long_text`, as `predict` does) and aggregated by mean, max and logsumexp.

Prints per setting: test accuracy, training seconds (frozen pass + head training), test prediction seconds,
and the number of windows.

    python bench/bench_long_text.py [--sizes 600,200,200] [--settings truncate:128,chunk:256:64] \\
        [--json runs/long_text.json] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from bench_backbones import SHARED, SPLITS, stratified_sizes
from bench_robustness import cpu_name

from llmclf import long_text
from llmclf.config import DEFAULT_BACKBONE
from llmclf.data.classification import LabelledTexts, read_labelled

SEED = 123
SETTINGS = "truncate:128,truncate:256,chunk:256:64,truncate:512"


def load_imdb(sizes: tuple[int, ...]) -> dict[str, LabelledTexts]:
    reviews = read_labelled(SHARED / "data/imdb/imdb_train_1000_balanced.csv")
    labels = ["positive" if label == "1" else "negative" for label in reviews.labels]
    return stratified_sizes(reviews.texts, labels, sizes, SEED)


def accuracy(probs: np.ndarray, classes: list[str], data: LabelledTexts) -> float:
    return float(np.mean([classes[i] == y for i, y in zip(probs.argmax(axis=1), data.labels, strict=True)]))


def run(setting: str, data: dict[str, LabelledTexts]) -> dict:
    from llmclf.classifier import make_classifier

    options: dict = {"ensemble": "none"}
    if setting.startswith("truncate:"):
        options["max_length"] = int(setting.split(":")[1])
    else:
        options["long_text"] = setting
    clf = make_classifier(DEFAULT_BACKBONE, **options)
    start = time.perf_counter()
    clf.fit(data["train"], data["validation"], progress=False)
    row: dict = {"train_seconds": time.perf_counter() - start, "max_length": clf.max_length_}
    test = data["test"]
    start = time.perf_counter()
    w = long_text.windowing(clf)
    if w is None:
        row["accuracy"] = accuracy(clf.predict_proba(test.texts), clf.classes_, test)
    else:  # the test windows once, aggregated three ways (`llmclf.long_text.probabilities` does one of them)
        windows, doc_of = long_text.expand(clf, test, w)
        window_probs = clf._probabilities(windows.texts, 32, dropout=False)
        row["windows"] = {"train": len(long_text.expand(clf, data["train"], w)[1]), "test": len(doc_of)}
        for how in long_text.AGGREGATES:
            probs = long_text.to_documents(window_probs, doc_of, len(test), how)
            row[f"accuracy_{how}"] = accuracy(probs, clf.classes_, test)
    row["predict_seconds"] = time.perf_counter() - start
    if w is not None:  # the library's own path agrees with the bench's shortcut (mean, on a few reviews)
        clf.aggregate_ = "mean"
        few = LabelledTexts(test.texts[:2], test.labels[:2], test.source)
        mean_few = long_text.to_documents(*_window_probs(clf, few, w), len(few), "mean")
        np.testing.assert_allclose(clf._text_probabilities(few.texts, 32, dropout=False), mean_few, atol=1e-4)
    return row


def _window_probs(clf, data: LabelledTexts, w) -> tuple[np.ndarray, list[int]]:
    windows, doc_of = long_text.expand(clf, data, w)
    return clf._probabilities(windows.texts, 32, dropout=False), doc_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="600,200,200", help="train,validation,test reviews")
    parser.add_argument("--settings", default=SETTINGS)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--limit", type=int, help="at most this many reviews per split (a smoke run)")
    args = parser.parse_args()
    sizes = tuple(int(n) for n in args.sizes.split(","))
    data = load_imdb(sizes)
    if args.limit:
        data = {s: LabelledTexts(d.texts[:args.limit], d.labels[:args.limit], d.source) for s, d in data.items()}
    print(f"machine: {cpu_name()}; IMDB {' / '.join(str(len(data[s])) for s in SPLITS)}; backbone "
          f"{DEFAULT_BACKBONE}, ensemble none", flush=True)
    results: dict = {"machine": cpu_name(), "sizes": [len(data[s]) for s in SPLITS], "settings": {}}
    for setting in args.settings.split(","):
        row = run(setting, data)
        results["settings"][setting] = row
        print(setting, json.dumps(row), flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    print("\n| reading | test accuracy | training s | prediction s |\n|---|---|---|---|")
    for setting, row in results["settings"].items():
        accs = {k.removeprefix("accuracy_") or "-": v for k, v in row.items() if k.startswith("accuracy")}
        cell = " / ".join(f"{v * 100:.2f} %" + (f" ({k})" if k != "accuracy" else "") for k, v in accs.items())
        print(f"| {setting} | {cell} | {row['train_seconds']:.0f} | {row['predict_seconds']:.0f} |")


if __name__ == "__main__":
    main()
