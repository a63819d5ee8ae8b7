"""Which backbone and recipe make the best default: 5-fold cross-validation on three data sets,
with the simple baselines in the same table.

Data sets (all from ../shared, seeded): the SMS course split (1,045 / 149 / 300), AG News
(`data/ag_news/test.csv`, 4 topics, stratified 1,000 / 200 / 1,000) and IMDB
(`data/imdb/imdb_train_1000_balanced.csv`, stratified 600 / 200 / 200).

Per data set:
1. Baselines, trained on train (+ validation where they have no use for it) and scored on test:
   TF-IDF word 1-2-grams + char 2-5-grams + LinearSVC (scikit-learn, fitted on train + validation);
   the hf engine with all-MiniLM-L6-v2 (its defaults: 3 epochs, lr 5e-5, linear decay); the
   course's recipe on SmolLM2-135M (no template, last block + final norm + head, 5 epochs, lr 5e-5).
2. Candidates: backbone x template x recipe (TRAINABLE:POOLING:LR:EPOCHS, scored after every epoch;
   a `+tfidf` suffix makes it `--ensemble tfidf`: see "The ensemble under cross-validation").
   Each backbone reads every text once up to its last two blocks (train, validation and test
   together; `Batches(cache_from=...)`, exact because the frozen part has no dropout); recipes
   that train fewer blocks continue from those states. Each candidate is scored by 5-fold
   cross-validated accuracy on train + validation after every epoch (constant lr: the first E
   epochs of a longer run are an E-epoch run).
3. The default: the candidate with the best mean cross-validated accuracy over the data sets (ties:
   fewer epochs, then the earlier candidate). It and each data set's own best are then trained as
   `llmclf train` does (train; best epoch by validation accuracy) and scored on test, once.

    python bench/bench_backbones.py [--datasets sms,ag_news,imdb] [--backbones smollm2-135m,gemma3-270m]
        [--recipes head:mean:1e-3:8,last-block:last:1e-4:4] [--folds 5] [--imdb-max-length 128] [--json F]
    # one data set at a time: the default is chosen over this run and the earlier ones' JSON
    python bench/bench_backbones.py --datasets imdb --previous runs/sms_ag.json --json runs/imdb.json
    python bench/bench_backbones.py --combine runs/sms_ag.json runs/imdb.json   # the choice, no runs

The ensemble under cross-validation: in each fold, the head and the n-gram model train on 80 % of
the fold's training part and the two weights are fitted on the other 20 % (as `llmclf train` fits
them on the validation set), after every epoch; the held-out fold scores the blend. The ensemble
thus trains on less data than the plain candidates it is compared with.

Timings are wall seconds on this machine (print the CPU with `lscpu`); the frozen pass of each
backbone is timed once and shared by its recipes.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from llmclf.data.classification import LabelledTexts, label_order, prepare_sms_spam, read_labelled
from llmclf.ngrams import NgramModel
from llmclf.tuning import FrozenFeatures, Recipe, cross_validate_cached, fold_indices

SPLITS = ("train", "validation", "test")
SHARED = Path(os.environ.get("LLMCLF_SHARED", Path(__file__).resolve().parents[2] / "shared"))
COURSE = ("smollm2-135m", None, "last-block:last:5e-5:5")
IMDB_SIZES = (600, 200, 200)
SEED = 123  # folds, the inner split of an ensemble's weights, the class head and the data order


# --- data ---------------------------------------------------------------------------------------

def stratified_sizes(texts: list[str], labels: list[str], sizes: tuple[int, ...], seed: int) -> dict:
    """Disjoint stratified samples of `sizes` texts (equal share per label), seeded."""
    rng = random.Random(seed)
    classes = label_order(labels)
    by_class = {c: [i for i, label in enumerate(labels) if label == c] for c in classes}
    for ids in by_class.values():
        rng.shuffle(ids)
    out, start = {}, 0
    for split, size in zip(SPLITS, sizes, strict=True):
        per_class = size // len(classes)
        ids = [i for c in classes for i in by_class[c][start:start + per_class]]
        rng.shuffle(ids)
        out[split] = LabelledTexts([texts[i] for i in ids], [labels[i] for i in ids], source=f"{split} sample")
        start += per_class
    return out


def load_sms(shared: Path, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        prepare_sms_spam(tmp, source=shared / "data/sms_spam/sms_spam_collection.zip", seed=seed)
        return {s: read_labelled(Path(tmp) / f"{s}.csv") for s in SPLITS}


def load_ag_news(shared: Path, seed: int) -> dict:
    names = (shared / "data/ag_news/classes.txt").read_text(encoding="utf-8").split()
    with open(shared / "data/ag_news/test.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    texts = [f"{title}. {description}" for _, title, description in rows]
    labels = [names[int(cls) - 1] for cls, _, _ in rows]
    return stratified_sizes(texts, labels, (1000, 200, 1000), seed)


def load_imdb(shared: Path, seed: int) -> dict:
    data = read_labelled(shared / "data/imdb/imdb_train_1000_balanced.csv")
    labels = ["positive" if label == "1" else "negative" for label in data.labels]
    return stratified_sizes(data.texts, labels, IMDB_SIZES, seed)


DATASETS = {"sms": load_sms, "ag_news": load_ag_news, "imdb": load_imdb}


# --- baselines ----------------------------------------------------------------------------------

def fit_tfidf_svm(data: dict):
    """The TF-IDF baseline (word 1-2-grams + char 2-5-grams, LinearSVC), fitted on train + validation."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import make_pipeline, make_union
    from sklearn.svm import LinearSVC

    model = make_pipeline(
        make_union(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1),
                   TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2)),
        LinearSVC(C=1.0))
    return model.fit(data["train"].texts + data["validation"].texts, data["train"].labels + data["validation"].labels)


def tfidf_baseline(data: dict) -> dict:
    start = time.perf_counter()
    model = fit_tfidf_svm(data)
    seconds = time.perf_counter() - start
    predicted = model.predict(data["test"].texts)
    return {"test": sum(p == t for p, t in zip(predicted, data["test"].labels, strict=True)) / len(predicted),
            "seconds": seconds}


def minilm_baseline(data: dict) -> dict:
    from llmclf.classifier import make_classifier

    start = time.perf_counter()
    clf = make_classifier("all-minilm-l6-v2", engine="hf").fit(data["train"], data["validation"], progress=False)
    seconds = time.perf_counter() - start
    return {"test": clf.evaluate(data["test"])["accuracy"], "seconds": seconds}


# --- the frozen pass, shared by every recipe (llmclf.tuning) ------------------------------------

class Features(FrozenFeatures):
    """`llmclf.tuning.FrozenFeatures` of every text of a data set (train, validation, test in that order),
    with each split's indices (`index`), in float32."""

    def __init__(self, backbone_spec: str, template: str | None, data: dict, max_length: int | None,
                 batch_size: int) -> None:
        classes = label_order(data["train"].labels)
        texts = [t for s in SPLITS for t in data[s].texts]
        labels = [classes.index(label) for s in SPLITS for label in data[s].labels]
        super().__init__(backbone_spec, texts, labels, classes, max_length, batch_size, seed=SEED, template=template,
                         precision="float32")
        sizes = [len(data[s]) for s in SPLITS]
        self.index = {s: list(range(sum(sizes[:i]), sum(sizes[:i + 1]))) for i, s in enumerate(SPLITS)}
        self.mean_tokens = sum(len(ids) for ids in self.encoded.ids) / len(self.encoded.ids)


def cross_validate(features: Features, recipe: str, folds: int) -> list[float]:
    """K-fold accuracy on train + validation after each of the recipe's epochs (`llmclf.tuning`'s
    cross-validation, pooled over the folds)."""
    pool = features.index["train"] + features.index["validation"]
    splits = [([pool[i] for i in a], [pool[i] for i in b])
              for a, b in fold_indices([features.labels[i] for i in pool], folds, SEED)]
    scores = cross_validate_cached(features, Recipe.parse(recipe), splits, SEED)
    sizes = np.array([len(held) for _, held in splits])
    return (sizes @ np.array(scores.accuracy) / sizes.sum()).tolist()


def test_run(features: Features, recipe: str, epochs: int) -> dict:
    """As `llmclf train` does: train on train, keep the best validation epoch (ties: the lower validation
    loss), score test once (with `+tfidf`: n-grams fitted on train, blend weights on validation)."""
    start = time.perf_counter()
    train_idx, val_idx, test_idx = (features.index[s] for s in SPLITS)
    parsed = Recipe.parse(recipe)
    per_epoch = features.probabilities_per_epoch(replace(parsed, epochs=epochs), train_idx, val_idx,
                                                 val_idx + test_idx, SEED)
    gold = {split: np.array([features.labels[i] for i in features.index[split]]) for split in SPLITS}
    n_val = len(val_idx)
    val_scores = [((p[:n_val].argmax(1) == gold["validation"]).mean(),
                   -np.log(p[np.arange(n_val), gold["validation"]] + 1e-12).mean()) for p in per_epoch]
    best = max(range(len(per_epoch)), key=lambda e: (val_scores[e][0], -val_scores[e][1], -e))
    probs = per_epoch[best]
    if parsed.ensemble:
        texts = lambda idx: [features.texts[i] for i in idx]  # noqa: E731
        ngrams = NgramModel.fit(texts(train_idx), gold["train"].tolist(), len(features.classes))
        ngrams.fit_weights(probs[:n_val], texts(val_idx), gold["validation"].tolist())
        test_probs = ngrams.blend(probs[n_val:], texts(test_idx))
    else:
        test_probs = probs[n_val:]
    seconds = time.perf_counter() - start
    return {"test": float((test_probs.argmax(1) == gold["test"]).mean()), "val": float(val_scores[best][0]),
            "best_epoch": best + 1, "train_seconds": seconds}


# --- the bench ----------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="sms,ag_news,imdb")
    parser.add_argument("--backbones", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--templates", default="auto", help="comma-separated: auto (instruction in the backbone's "
                        "chat format, naming the labels) and/or none")
    parser.add_argument("--recipes", default="head:last:1e-3:8,head:mean:1e-3:8,last-block:last:1e-4:4",
                        help="comma-separated TRAINABLE:POOLING:LR:EPOCHS (head, last-block or last-n:2); scored "
                        "after every epoch up to EPOCHS")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--imdb-max-length", type=int, default=128, help="tokens per IMDB review (the template's "
                        "end is kept)")
    parser.add_argument("--skip-baselines", action="store_true")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    parser.add_argument("--limit", type=int, help="at most this many texts per split (a quick smoke run)")
    parser.add_argument("--imdb-sizes", default="600,200,200", help="IMDB train,validation,test texts")
    parser.add_argument("--previous", type=Path, nargs="*", default=[], help="--json files of earlier runs (other "
                        "data sets): the default is chosen over them and this run together")
    parser.add_argument("--combine", type=Path, nargs="+", help="no runs: the default over the data sets of "
                        "these --json files (written by earlier runs, e.g. one per data set)")
    args = parser.parse_args()
    if args.combine:
        results = {name: res for path in args.combine for name, res in json.loads(path.read_text()).items()}
        for name, res in results.items():
            own = best_epochs(res["candidates"])
            for key in sorted(own, key=lambda k: own[k], reverse=True):
                print(f"{name:8s} {key:40s} best cv {own[key][0]:.4f} at epoch {-own[key][1]}")
        key, epochs, mean = choose_default(results)
        per_set = ", ".join(f"{n} {results[n]['candidates'][key]['cv'][epochs - 1]:.4f}" for n in results)
        print(f"default (best mean cv accuracy over {', '.join(results)}): {key} x{epochs} ({mean:.4f}); "
              f"per data set: {per_set}")
        return
    global IMDB_SIZES
    IMDB_SIZES = tuple(int(n) for n in args.imdb_sizes.split(","))
    shared = SHARED
    print(f"machine: {platform.machine()} {platform.processor()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, float32", flush=True)
    results: dict = {}
    kept: dict[tuple[str, str], Features] = {}  # (data set, candidate prefix) -> states, for the test runs
    for name in args.datasets.split(","):
        data = DATASETS[name](shared, 123)
        if args.limit:
            data = {s: LabelledTexts(d.texts[:args.limit], d.labels[:args.limit], d.source) for s, d in data.items()}
        res = results[name] = {"sizes": [len(data[s]) for s in SPLITS], "baselines": {}, "candidates": {}}
        print(f"\n== {name}: {' / '.join(map(str, res['sizes']))}", flush=True)
        if not args.skip_baselines:
            res["baselines"]["tfidf"] = tfidf_baseline(data)
            print(f"tfidf+svm       test {res['baselines']['tfidf']['test']:.4f}  "
                  f"{res['baselines']['tfidf']['seconds']:.1f} s", flush=True)
            res["baselines"]["minilm"] = minilm_baseline(data)
            print(f"minilm (hf)     test {res['baselines']['minilm']['test']:.4f}  "
                  f"{res['baselines']['minilm']['seconds']:.1f} s", flush=True)
        max_length = args.imdb_max_length if name == "imdb" else None
        templates = [None if t == "none" else t for t in args.templates.split(",")]
        combos = [(b, t) for b in args.backbones.split(",") for t in templates]
        if not args.skip_baselines and (COURSE[0], COURSE[1]) not in combos:
            combos.append((COURSE[0], COURSE[1]))
        for backbone, template in combos:
            features = Features(backbone, template, data, max_length, args.batch_size)
            key = f"{backbone}|{template or 'none'}"
            print(f"{key}: frozen pass {features.seconds:.0f} s ({features.mean_tokens:.0f} tokens/text, "
                  f"{features.truncated} cut)", flush=True)
            if (backbone, template) == (COURSE[0], COURSE[1]) and not args.skip_baselines:
                res["baselines"]["course"] = {**test_run(features, COURSE[2], 5),
                                              "frozen_seconds": features.seconds}
                print(f"course recipe   test {res['baselines']['course']['test']:.4f}", flush=True)
                if template not in templates:
                    continue
            for recipe in args.recipes.split(","):
                start = time.perf_counter()
                scores = cross_validate(features, recipe, args.folds)
                res["candidates"][f"{key}|{recipe}"] = {"cv": scores, "cv_seconds": time.perf_counter() - start,
                                                        "frozen_seconds": features.seconds}
                print(f"  {recipe:24s} cv accuracy per epoch {' '.join(f'{s:.4f}' for s in scores)}  "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
            kept[name, key] = features
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    previous = {n: r for path in args.previous for n, r in json.loads(path.read_text()).items()}
    choose_and_test(results, kept, args, {**previous, **results})
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def best_epochs(candidates: dict) -> dict[str, tuple[float, int]]:
    """Candidate -> (best cv accuracy, its epoch); ties to fewer epochs."""
    return {k: max((s, -e) for e, s in enumerate(v["cv"], start=1)) for k, v in candidates.items()}


def choose_default(results: dict) -> tuple[str, int, float]:
    """(candidate, epochs, mean cv accuracy): the best mean over the data sets in `results`; ties go
    to fewer epochs, then to the candidate first in sorted order."""
    names = list(results)
    shared_keys = set.intersection(*(set(results[n]["candidates"]) for n in names))
    scored = []
    for rank, key in enumerate(sorted(shared_keys)):
        for epoch in range(1, Recipe.parse(key.split("|")[2]).epochs + 1):
            mean = sum(results[n]["candidates"][key]["cv"][epoch - 1] for n in names) / len(names)
            scored.append((mean, -epoch, -rank, key, epoch))
    mean, _, _, key, epochs = max(scored)
    return key, epochs, mean


def choose_and_test(results: dict, kept: dict, args: argparse.Namespace, chosen_over: dict) -> None:
    """The default by `chosen_over` (these results and earlier runs' --previous ones); test runs of it
    and of each data set's own best, for the data sets of this run."""
    names = list(results)
    default_key, default_epochs, mean = choose_default(chosen_over)
    print(f"\ndefault (best mean {args.folds}-fold cv accuracy over {', '.join(chosen_over)}): {default_key} "
          f"{default_epochs} epochs ({mean:.4f})")
    for name in names:
        res = results[name]
        own = best_epochs(res["candidates"])
        own_key = max(own, key=lambda k: own[k])
        picks = {"default": (default_key, default_epochs), "own best": (own_key, -own[own_key][1])}
        for label, (key, epochs) in picks.items():
            backbone, template, recipe = key.split("|")
            res[label] = {"candidate": key, "epochs": epochs, "cv": res["candidates"][key]["cv"][epochs - 1],
                          **test_run(kept[name, f"{backbone}|{template}"], recipe, epochs)}
        print_table(name, res)


def print_table(name: str, res: dict) -> None:
    print(f"\n{name} ({' / '.join(map(str, res['sizes']))})")
    print(f"| {'model':58s} | cv acc | test acc | seconds |")
    print(f"|{'-' * 60}|-------:|---------:|--------:|")
    base = res["baselines"]
    rows = [("TF-IDF word 1-2 + char 2-5 + LinearSVC", None, base.get("tfidf", {}).get("test"),
             base.get("tfidf", {}).get("seconds")),
            ("hf engine, all-MiniLM-L6-v2 (3 epochs, lr 5e-5)", None, base.get("minilm", {}).get("test"),
             base.get("minilm", {}).get("seconds")),
            ("course recipe: SmolLM2, last-block, no template, 5 ep, 5e-5", None, base.get("course", {}).get("test"),
             (base.get("course", {}).get("frozen_seconds") or 0) + (base.get("course", {}).get("train_seconds") or 0))]
    for label in ("default", "own best"):
        r = res[label]
        rows.append((f"{label}: {r['candidate']} x{r['epochs']}", r["cv"], r["test"],
                     res["candidates"][r["candidate"]]["frozen_seconds"] + r["train_seconds"]))
    for label, cv, test, seconds in rows:
        fmt = lambda v, p: "-" if v is None else f"{v * 100:.2f}" if p else f"{v:.0f}"  # noqa: E731
        print(f"| {label:58s} | {fmt(cv, 1):>6s} | {fmt(test, 1):>8s} | {fmt(seconds, 0):>7s} |")


if __name__ == "__main__":
    main()
