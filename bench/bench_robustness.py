"""In-domain and cross-domain accuracy in one table: TF-IDF, encoders, llmclf's defaults, `tune`'s winner.

Each data set is split (seeded) into train / validation / test; every model trains on train (validation
for model selection; TF-IDF on train + validation) and is scored once on the in-domain test split and
on two cross-domain test sets with the same labels that no model saw:

- `ag_news`: 1,000 / 200 / 1,000 articles ("title. description") from `data/ag_news/test.csv`;
  cross-domain: the headlines alone of 1,000 other articles (short, no description); cross-domain 2:
  the descriptions alone (no headline) of 1,000 further articles.
- `imdb`: 600 / 200 / 200 reviews; cross-domain: the last sentence (5-40 words) of each review of
  the test split, labelled as its review (a verdict line, read without the review; some are neutral,
  which costs every model alike); cross-domain 2: the first such sentence of each (often a premise
  or a plot line: harder still).
- `sms`: the course split (1,045 / 149 / 300); cross-domain: `bench/data/emails.csv`, 120 e-mails
  (60 spam, 60 ham, subject + body); cross-domain 2: `bench/data/modern_sms.csv`, 100 text messages
  of the 2020s (50 / 50), both written for llmclf (synthetic: see `bench/data/README.md`).

The second cross-domain sets were built after the blend rules were compared on the first ones
(`bench_blend_rules.py`), to check that comparison's choice on data it was not made on.

Models (`--models`, comma-separated):
- `tfidf`: word 1-2-grams + char 2-5-grams, LinearSVC (scikit-learn), fitted on train + validation;
- `default`: `llmclf train`'s defaults (`make_classifier()` with no options);
- any model spec with options: `SPEC[;name=value;...]`, e.g. `all-minilm-l6-v2`,
  `gemma3-270m;pooling=mean;ensemble=none`;
- `dir:PATTERN`: an already trained model directory, `{dataset}` filled in (e.g. the winner of
  `llmclf tune ... --out runs/tune-{dataset}`: `dir:runs/tune-{dataset}/model`).

    python bench/bench_robustness.py --datasets ag_news,imdb --models tfidf,default,all-minilm-l6-v2 \\
        [--json runs/robustness.json] [--limit N]

Prints one row per model: accuracy in domain and cross-domain per data set, and the training seconds.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import platform
import random
import re
import subprocess
import time
from pathlib import Path

import numpy as np
from bench_backbones import SHARED, SPLITS, fit_tfidf_svm, load_sms, stratified_sizes

from llmclf.config import DEFAULT_BACKBONE
from llmclf.data.classification import LabelledTexts, label_order, read_labelled

SEED = 123


def _ag_news(shared: Path, seed: int) -> tuple[list[list[str]], dict, list[int], list[int]]:
    """AG News rows, the splits, the 1,000 articles whose headlines are the cross-domain set, and the
    1,000 further articles whose descriptions are the second one (stratified, disjoint from the rest)."""
    names = (shared / "data/ag_news/classes.txt").read_text(encoding="utf-8").split()
    with open(shared / "data/ag_news/test.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    texts = [f"{title}. {description}" for _, title, description in rows]
    labels = [names[int(cls) - 1] for cls, _, _ in rows]
    data = stratified_sizes(texts, labels, (1000, 200, 1000), seed)
    used = {t for split in data.values() for t in split.texts}
    rest = [i for i, t in enumerate(texts) if t not in used]
    rng = random.Random(seed)
    by_class = {c: [i for i in rest if labels[i] == c] for c in label_order(labels)}
    picked = [i for ids in by_class.values() for i in rng.sample(ids, 250)]
    rng.shuffle(picked)
    taken = set(picked)
    rng = random.Random(seed + 1)
    second = [i for ids in by_class.values() for i in rng.sample([i for i in ids if i not in taken], 250)]
    rng.shuffle(second)
    return [[labels[i], *row[1:]] for i, row in enumerate(rows)], data, picked, second


def load_ag_news(shared: Path, seed: int) -> tuple[dict, LabelledTexts]:
    """AG News splits, and the headlines of 1,000 other articles (stratified, disjoint from the splits)."""
    rows, data, picked, _ = _ag_news(shared, seed)
    return data, LabelledTexts([rows[i][1] for i in picked], [rows[i][0] for i in picked], "AG News headlines")


def ag_news_descriptions(shared: Path, seed: int) -> LabelledTexts:
    """The second cross-domain set: the descriptions alone (no headline) of 1,000 further articles."""
    rows, _, _, second = _ag_news(shared, seed)
    return LabelledTexts([rows[i][2] for i in second], [rows[i][0] for i in second], "AG News descriptions")


def review_sentences(review: str) -> list[str]:
    """The review's sentences of 5-40 words, in order (HTML line breaks removed)."""
    text = re.sub(r"<br\s*/?>", " ", review)
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
    return [s for s in sentences if 5 <= len(s.split()) <= 40]


def last_sentence(review: str) -> str | None:
    """The review's last sentence of 5-40 words, or None."""
    return (review_sentences(review) or [None])[-1]


def _imdb(shared: Path, seed: int) -> dict:
    reviews = read_labelled(shared / "data/imdb/imdb_train_1000_balanced.csv")
    labels = ["positive" if label == "1" else "negative" for label in reviews.labels]
    return stratified_sizes(reviews.texts, labels, (600, 200, 200), seed)


def load_imdb(shared: Path, seed: int) -> tuple[dict, LabelledTexts]:
    """IMDB splits, and the last sentences of the test reviews (labelled as their review)."""
    data = _imdb(shared, seed)
    pairs = [(last_sentence(t), y) for t, y in zip(data["test"].texts, data["test"].labels, strict=True)]
    pairs = [(s, y) for s, y in pairs if s]
    return data, LabelledTexts([s for s, _ in pairs], [y for _, y in pairs], "IMDB test reviews' last sentences")


def imdb_first_sentences(shared: Path, seed: int) -> LabelledTexts:
    """The second cross-domain set: the first sentence (5-40 words) of each test review, labelled as its
    review (often a premise or plot line, so harder than the verdict; it costs every model alike)."""
    test = _imdb(shared, seed)["test"]
    pairs = [(review_sentences(t), y) for t, y in zip(test.texts, test.labels, strict=True)]
    pairs = [(s[0], y) for s, y in pairs if s]
    return LabelledTexts([s for s, _ in pairs], [y for _, y in pairs], "IMDB test reviews' first sentences")


EMAILS = Path(__file__).resolve().parent / "data" / "emails.csv"


def load_sms_and_emails(shared: Path, seed: int) -> tuple[dict, LabelledTexts]:
    """The course's SMS split, and the e-mails of `bench/data/emails.csv`."""
    return load_sms(shared, seed), read_labelled(EMAILS)


MODERN_SMS = EMAILS.parent / "modern_sms.csv"

DATASETS = {"ag_news": load_ag_news, "imdb": load_imdb, "sms": load_sms_and_emails}
# Second cross-domain sets, built after the blend rules were compared on the first ones, to confirm a
# choice made there on data it was not made on (`bench_blend_rules.py`).
SECOND_CROSS = {"ag_news": ag_news_descriptions, "imdb": imdb_first_sentences,
                "sms": lambda shared, seed: read_labelled(MODERN_SMS)}


def accuracy(predicted: list[str], data: LabelledTexts) -> float:
    return sum(p == t for p, t in zip(predicted, data.labels, strict=True)) / len(data)


def run_tfidf(data: dict, tests: dict) -> dict:
    start = time.perf_counter()
    model = fit_tfidf_svm(data)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, **{name: accuracy(list(model.predict(t.texts)), t) for name, t in tests.items()}}


def run_llmclf(spec: str, name: str, data: dict, tests: dict) -> dict[str, dict]:
    """Train (or load) one llmclf model and score it on `tests`: {row name: {test: accuracy, "seconds": s}}.

    A model with the n-gram blend also gives the row `SPEC (old)`: the same fit, scored as the defaults
    before out-of-fold blend weights and temperature scaling would score it (blend weights fitted on the
    validation set alone, no temperature; the head is trained before either, so it is the same head),
    and the rows `SPEC [language model]`, `SPEC [n-grams]` (and `SPEC [sentence encoder]`): each member of
    the blend alone.
    """
    from llmclf.classifier import load_classifier, make_classifier
    from llmclf.training.calibration import decide

    start = time.perf_counter()
    if spec.startswith("dir:"):
        clf = load_classifier(spec[4:].format(dataset=name))
        seconds = float((clf.config_.get("metrics") or {}).get("train_seconds") or 0.0)
    else:
        model, *pairs = spec.split(";")
        options = {}
        for pair in pairs:
            key, value = pair.split("=", 1)
            options[key] = json.loads(value) if re.fullmatch(r"[-0-9.e]+|true|false|null", value) else value
        clf = make_classifier(DEFAULT_BACKBONE if model == "default" else model, **options)
        clf.fit(data["train"], data["validation"], progress=False)
        seconds = time.perf_counter() - start
    report = getattr(clf, "ensemble_report_", None) or {}
    old_blend = None
    if getattr(clf, "ngrams_", None) is not None and "weights_validation_only" in report:
        old_blend = copy.copy(clf.ngrams_)
        old_blend.weights = np.asarray(report["weights_validation_only"], dtype=np.float32)
    members = ["n-grams", *(["sentence encoder"] if getattr(clf, "encoder_", None) is not None else [])] \
        if getattr(clf, "ngrams_", None) is not None else []
    extra = [f"{spec} (old)"] if old_blend else []
    extra += [f"{spec} [{member}]" for member in ("language model", *members)] if members else []
    rows = {name: {"seconds": seconds} for name in (spec, *extra)}
    labelled = lambda probs: [clf.classes_[i] for i in probs.argmax(1)]  # noqa: E731
    for test, texts in tests.items():
        # predict_proba's own steps, the language model's pass and the members' scores computed once for every row
        lm_probs = clf._text_probabilities(texts.texts, 32, dropout=False)
        scores = clf._blend_scores(texts.texts)
        probs = clf._calibrated(clf._with_ngrams(lm_probs, texts.texts, scores))
        rows[spec][test] = accuracy([clf.classes_[i] for i in decide(probs, clf.decision)], texts)
        if old_blend:
            rows[f"{spec} (old)"][test] = accuracy(labelled(old_blend.combine(lm_probs, *scores)), texts)
        if members:
            rows[f"{spec} [language model]"][test] = accuracy(labelled(lm_probs), texts)
            for member, member_scores in zip(members, scores, strict=True):
                rows[f"{spec} [{member}]"][test] = accuracy(labelled(member_scores), texts)
    return rows


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="sms,ag_news,imdb")
    parser.add_argument("--models", default="tfidf,default,all-minilm-l6-v2")
    parser.add_argument("--json", type=Path, help="also write the figures here (merged into an existing file)")
    parser.add_argument("--limit", type=int, help="at most this many texts per split (a smoke run)")
    args = parser.parse_args()
    print(f"machine: {cpu_name()}", flush=True)
    results = json.loads(args.json.read_text()) if args.json and args.json.is_file() else {}
    for name in args.datasets.split(","):
        data, cross = DATASETS[name](SHARED, SEED)
        tests = {"in-domain": data["test"], "cross-domain": cross, "cross-domain 2": SECOND_CROSS[name](SHARED, SEED)}
        if args.limit:
            data = {s: LabelledTexts(d.texts[:args.limit], d.labels[:args.limit], d.source) for s, d in data.items()}
            tests = {k: LabelledTexts(t.texts[:args.limit], t.labels[:args.limit], t.source) for k, t in tests.items()}
        print(f"\n== {name}: {' / '.join(str(len(data[s])) for s in SPLITS)}; cross-domain: "
              + "; ".join(f"{t.source} ({len(t)})" for k, t in tests.items() if k != "in-domain"), flush=True)
        for model in args.models.split(","):
            rows = {model: run_tfidf(data, tests)} if model == "tfidf" else run_llmclf(model, name, data, tests)
            for row_name, row in rows.items():
                results.setdefault(name, {})[row_name] = row
                print(f"{row_name:50s} " + "  ".join(f"{k} {v * 100:6.2f}%" for k, v in row.items() if k != "seconds")
                      + f"  ({row['seconds']:.0f} s)", flush=True)
            if args.json:
                args.json.write_text(json.dumps(results, indent=1))
    print("\n| model | " + " | ".join(f"{n} in / cross / cross 2" for n in results) + " |")
    print("|---|" + "---|" * len(results))
    for model in dict.fromkeys(m for rows in results.values() for m in rows):
        cells = []
        for rows in results.values():
            row = rows.get(model)
            cells.append("-" if row is None else " / ".join(
                f"{row[k] * 100:.2f} %" for k in ("in-domain", "cross-domain", "cross-domain 2") if k in row))
        print(f"| {model} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
