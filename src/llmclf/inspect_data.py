"""`llmclf inspect`: which examples of a labelled data set are likely wrong, duplicated or odd.

Every example gets class probabilities from a model that did not see it: k-fold (scikit-learn's
`StratifiedKFold`, seeded), a cheap model per fold — the n-gram model (`llmclf.ngrams`, TF-IDF
logistic regression) for `model="tfidf"`, else a logistic regression on a backbone's mean-pooled
final states, computed once for all texts (`llmclf.tuning.FrozenFeatures`). From these out-of-fold
probabilities cleanlab's confident learning flags likely label errors
(`cleanlab.filter.find_label_issues`), scores every label (`cleanlab.rank.get_label_quality_scores`,
low = suspect) and lists the class pairs most often confused (`cleanlab.dataset.find_overlapping_classes`).
On the same features (TF-IDF vectors or centred embeddings), cosine nearest neighbours give
near-duplicates (cosine >= `duplicate_threshold`) and an outlier score (mean cosine distance to the
`OUTLIER_NEIGHBOURS` nearest examples).

Output: `label_issues.csv`, every example ranked by label quality (most suspect first), and
`report.json`, the counts and the class pairs.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmclf.data.classification import LabelledTexts, label_order
from llmclf.errors import ConfigError, DataError
from llmclf.loaders.tensors import atomic_path, atomic_write_json

ISSUES_CSV = "label_issues.csv"
REPORT_JSON = "report.json"
COLUMNS = ("rank", "row", "text", "given_label", "suggested_label", "label_quality", "is_issue",
           "duplicate_of", "outlier_score")
NGRAM_MODEL = "tfidf"
OUTLIER_NEIGHBOURS = 10
DUPLICATE_THRESHOLD = 0.95


@dataclass
class InspectResult:
    """What `inspect_data` found; `rows` are the CSV's records, most suspect first."""

    rows: list[dict[str, Any]]
    report: dict[str, Any]
    out_dir: Path | None = None
    pred_probs: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))

    @property
    def issues(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["is_issue"]]


def _require_cleanlab() -> None:
    import importlib.util

    if importlib.util.find_spec("cleanlab") is None:
        raise ConfigError("llmclf inspect needs the cleanlab package: pip install 'llmclf[inspect]' "
                          "(or pip install cleanlab)")


def _ngram_features(texts: list[str], label_ids: list[int], n_classes: int,
                    folds: list[tuple[list[int], list[int]]]) -> tuple[np.ndarray, Any]:
    """Out-of-fold probabilities of the n-gram model, and every text's TF-IDF vector (unit rows)."""
    from sklearn.preprocessing import normalize

    from llmclf.ngrams import NgramModel, _tfidf, ngram_counts

    probs = np.zeros((len(texts), n_classes))
    for train_idx, held_idx in folds:
        model = NgramModel.fit([texts[i] for i in train_idx], [label_ids[i] for i in train_idx], n_classes)
        probs[held_idx] = np.exp(model.scores([texts[i] for i in held_idx]))
    whole = NgramModel.fit(texts, label_ids, n_classes)  # its idf: the vectors the neighbours are found in
    return probs, normalize(_tfidf(ngram_counts(texts), whole.idf.astype(np.float64)))


def _backbone_features(model: str, texts: list[str], label_ids: list[int], classes: list[str],
                       folds: list[tuple[list[int], list[int]]], seed: int, max_length: int | None,
                       batch_size: int, progress: bool, precision: str) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold probabilities of a logistic regression on the backbone's mean-pooled final states,
    and those states centred and scaled to unit rows (so cosine is not dominated by their common direction)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from llmclf.engines import choose_engine
    from llmclf.tuning import FrozenFeatures

    if choose_engine(model) != "scratch":
        raise ConfigError(f"--model {model}: inspect reads the frozen states of a scratch-engine backbone (a packaged "
                          f"model, GGUF, Hugging Face directory of a registered family or an llmclf model directory "
                          f"trained from one), or use --model {NGRAM_MODEL}")
    frozen = FrozenFeatures(model, texts, label_ids, classes, max_length=max_length, batch_size=batch_size,
                            seed=seed, progress=progress, template=None, precision=precision)
    states = frozen.at(frozen.n_layers)
    pooled = np.stack([s.float().mean(0).numpy() for s in states.states])
    probs = np.zeros((len(texts), len(classes)))
    for train_idx, held_idx in folds:
        head = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
        head.fit(pooled[train_idx], [label_ids[i] for i in train_idx])
        probs[held_idx] = head.predict_proba(pooled[held_idx])
    centred = pooled - pooled.mean(0, keepdims=True)
    return probs, centred / np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-12)


def _neighbours(vectors: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest other rows of every row by cosine: (indices, similarities), nearest first."""
    from sklearn.neighbors import NearestNeighbors

    n = vectors.shape[0]
    k = min(k, n - 1)
    knn = NearestNeighbors(n_neighbors=k + 1, metric="cosine", algorithm="brute").fit(vectors)
    dist, idx = knn.kneighbors(vectors)
    # exact duplicates tie at distance 0, so a row is not always its own first neighbour: drop it wherever it is
    keep = idx != np.arange(n)[:, None]
    keep[keep.sum(1) > k, -1] = False  # rows whose self was not among the k + 1
    return idx[keep].reshape(n, k), 1.0 - dist[keep].reshape(n, k)


def inspect_data(data: LabelledTexts, out_dir: str | Path | None = None, model: str = NGRAM_MODEL, folds: int = 5,
                 seed: int = 123, duplicate_threshold: float = DUPLICATE_THRESHOLD, max_length: int | None = None,
                 batch_size: int = 8, progress: bool = True, precision: str = "auto") -> InspectResult:
    """Likely label errors, near-duplicates, outliers and overlapping classes of `data` (module docstring).

    Args:
        model: `tfidf` (the n-gram model, seconds) or a scratch-engine backbone / trained model directory
            whose mean-pooled final states feed a logistic regression.
        folds, seed: `StratifiedKFold(folds, shuffle=True, random_state=seed)` for the out-of-fold probabilities.
        duplicate_threshold: cosine similarity from which two examples count as near-duplicates.
        out_dir: where `label_issues.csv` and `report.json` are written (None: not written).
    """
    if data.label_sep:
        raise DataError(f"{data.source} is multi-label (several labels per text); inspect takes one label per text")
    _require_cleanlab()
    from cleanlab.dataset import find_overlapping_classes
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    from llmclf.tuning import fold_indices

    if folds < 2:
        raise ConfigError(f"folds must be at least 2, got {folds}")
    if not 0.0 < duplicate_threshold <= 1.0:
        raise ConfigError(f"duplicate threshold must be in (0, 1], got {duplicate_threshold}")
    classes = label_order(data.labels)
    if len(classes) < 2:
        raise DataError(f"{data.source}: the data has a single label {classes}; label issues need 2 or more classes")
    label_ids = [classes.index(label) for label in data.labels]
    counts = np.bincount(label_ids, minlength=len(classes))
    if counts.min() < folds:
        rarest = int(counts.argmin())
        raise DataError(f"{data.source}: label {classes[rarest]!r} has {counts[rarest]} example(s), fewer than the "
                        f"{folds} folds; lower --folds or add examples")
    start = time.perf_counter()
    fold_index = fold_indices(label_ids, folds, seed)
    if model == NGRAM_MODEL:
        probs, vectors = _ngram_features(data.texts, label_ids, len(classes), fold_index)
    else:
        probs, vectors = _backbone_features(model, data.texts, label_ids, classes, fold_index, seed, max_length,
                                            batch_size, progress, precision)
    labels = np.array(label_ids)
    probs = probs / probs.sum(1, keepdims=True)
    # n_jobs=1: no worker processes (forked, they would inherit the CLI's signal handlers)
    is_issue = find_label_issues(labels, probs, n_jobs=1)
    quality = get_label_quality_scores(labels, probs)
    overlap = find_overlapping_classes(labels=labels, pred_probs=probs, class_names=classes)

    neighbour_idx, similarity = _neighbours(vectors, OUTLIER_NEIGHBOURS)
    outlier = 1.0 - similarity.mean(1)
    duplicate_of: list[int | None] = []
    for i in range(len(labels)):
        close = neighbour_idx[i][(similarity[i] >= duplicate_threshold) & (neighbour_idx[i] < i)]
        earlier = [int(j) for j in close]
        duplicate_of.append(min(earlier) if earlier else None)
    suggested = probs.argmax(1)

    rows = []
    for rank, i in enumerate(np.argsort(quality, kind="stable"), start=1):
        dup = duplicate_of[i]
        rows.append({"rank": rank, "row": int(i) + 1, "text": data.texts[i], "given_label": classes[labels[i]],
                     "suggested_label": classes[suggested[i]], "label_quality": round(float(quality[i]), 6),
                     "is_issue": bool(is_issue[i]), "duplicate_of": "" if dup is None else dup + 1,
                     "outlier_score": round(float(outlier[i]), 6)})
    duplicates = [i for i, d in enumerate(duplicate_of) if d is not None]
    conflicting = [i for i in duplicates if labels[i] != labels[duplicate_of[i]]]
    report = {
        "source": data.source, "model": model, "folds": folds, "seed": seed, "examples": len(labels),
        "classes": classes, "examples_per_class": {c: int(n) for c, n in zip(classes, counts, strict=True)},
        "out_of_fold_accuracy": float((suggested == labels).mean()),
        "label_issues": int(is_issue.sum()),
        "label_issues_per_given_label": {c: int(is_issue[labels == k].sum()) for k, c in enumerate(classes)},
        "duplicate_threshold": duplicate_threshold, "near_duplicates": len(duplicates),
        "near_duplicates_with_another_label": len(conflicting),
        "top_outliers": [{"row": int(i) + 1, "outlier_score": round(float(outlier[i]), 6), "text": data.texts[i]}
                         for i in np.argsort(-outlier, kind="stable")[:5]],
        "overlapping_classes": [
            {"class_a": str(r["Class Name A"]), "class_b": str(r["Class Name B"]),
             "examples": int(r["Num Overlapping Examples"]), "joint_probability": float(r["Joint Probability"])}
            for _, r in overlap.iterrows() if r["Num Overlapping Examples"] > 0],
        "seconds": round(time.perf_counter() - start, 2),
    }
    result = InspectResult(rows, report, Path(out_dir) if out_dir is not None else None, probs)
    if out_dir is not None:
        write(result, out_dir)
    return result


def write(result: InspectResult, out_dir: str | Path) -> None:
    """`label_issues.csv` and `report.json` in `out_dir` (each written to a temp file and renamed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / ISSUES_CSV) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(result.rows)
    atomic_write_json(out / REPORT_JSON, result.report)
