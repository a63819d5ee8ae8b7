"""Multi-label classification: any number of labels per text.

A text's labels are written in one label column joined by a separator (`--label-sep ','`: `World,Sports`)
or, in JSON lines, as a list (`"label": ["World", "Sports"]`). Inside llmclf a multi-label row keeps its
labels as one string, sorted and joined by the data's separator (`LabelledTexts.label_sep`), so that
files, splits and run fingerprints handle it as any label. The model has one sigmoid output per label,
trained with binary cross-entropy (`--class-weights` gives each label's `pos_weight`); after training, a
threshold per label is tuned on the validation set (F1) and saved in config.json, and a text gets every
label whose probability reaches its threshold (at least one: the most probable, if none does).

What has no multi-label meaning is off: the TF-IDF blend (`--ensemble`), temperature calibration,
`--tune-threshold` and MC-dropout.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llmclf.errors import DataError

DEFAULT_SEP = ","  # joins the labels of a JSON list when no --label-sep is given
THRESHOLD_GRID = np.round(np.linspace(0.05, 0.95, 19), 2)


def split_labels(value: str, sep: str, where: str = "") -> str:
    """`value` ("b, a") as the canonical label string ("a,b": names stripped, sorted, each once);
    an empty name (",a", "a,,b") is a DataError naming `where`."""
    names = [name.strip() for name in value.split(sep)]
    return join_labels(names, sep, where, value)


def join_labels(names: Sequence[object], sep: str, where: str = "", written: object = None) -> str:
    """The canonical label string of a list of label names (a JSON list); see `split_labels`."""
    at = f"{where}: " if where else ""
    texts = [str(name).strip() if name is not None else "" for name in names]
    if not texts:
        raise DataError(f"{at}the label set is empty; every text needs at least one label")
    if any(not name for name in texts):
        raise DataError(f"{at}the label set {written if written is not None else list(names)!r} holds an empty "
                        f"label (separator {sep!r}); write each label once between separators")
    clashing = [name for name in texts if sep in name]
    if clashing:
        raise DataError(f"{at}the label {clashing[0]!r} holds the separator {sep!r}; choose another with "
                        "--label-sep")
    return sep.join(sorted(set(texts), key=_order_key(texts)))


def _order_key(names: list[str]):
    try:
        [int(n) for n in names]
    except ValueError:
        return str
    return int


def label_sets(labels: Sequence[str], sep: str) -> list[list[str]]:
    """Each row's label names (of canonical label strings joined by `sep`)."""
    return [label.split(sep) for label in labels]


def multi_hot(sets: Sequence[Sequence[str]], classes: Sequence[str]) -> np.ndarray:
    """(N, K) 0/1 int matrix: row i has a 1 for each label of text i (columns in `classes` order)."""
    index = {c: k for k, c in enumerate(classes)}
    y = np.zeros((len(sets), len(classes)), dtype=np.int64)
    for i, names in enumerate(sets):
        for name in names:
            y[i, index[name]] = 1
    return y


def bce_loss(logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor | None = None,
             reduction: str = "mean") -> torch.Tensor:
    """Binary cross-entropy of one sigmoid per label, in float32: per text the mean over labels (positive
    terms times `pos_weight`), then the mean or sum over texts."""
    weight = pos_weight.to(logits.device) if pos_weight is not None else None
    per_text = F.binary_cross_entropy_with_logits(logits.float(), targets.to(logits.device).float(),
                                                  pos_weight=weight, reduction="none").mean(-1)
    return per_text.sum() if reduction == "sum" else per_text.mean()


def pos_weights(weights: str | list[float] | None, y: np.ndarray) -> torch.Tensor | None:
    """`--class-weights` as BCE `pos_weight` per label: `balanced` is negatives / positives of each label
    in the training set; numbers are taken as they are (one per label)."""
    if weights is None:
        return None
    if weights == "balanced":
        positives = y.sum(axis=0).astype(np.float64)
        return torch.tensor((len(y) - positives) / np.maximum(positives, 1), dtype=torch.float32)
    return torch.tensor(weights, dtype=torch.float32)


def decide_sets(probs: np.ndarray, thresholds: Sequence[float] | None = None) -> np.ndarray:
    """(N, K) bool: label k of text i is chosen when its probability reaches threshold k (0.5 without
    thresholds); a text none reaches gets its most probable label."""
    probs = np.asarray(probs, dtype=np.float64)
    chosen = probs >= (0.5 if thresholds is None else np.asarray(thresholds, dtype=np.float64))
    if len(probs):
        chosen[np.arange(len(probs)), probs.argmax(axis=1)] |= ~chosen.any(axis=1)
    return chosen


def tune_thresholds(probs: np.ndarray, y: np.ndarray, grid: np.ndarray = THRESHOLD_GRID) -> list[float]:
    """Per label, the threshold of `grid` with the best validation F1 of that label (ties: the one
    closest to 0.5); 0.5 for a label with no positive text in the validation set."""
    thresholds = []
    for k in range(y.shape[1]):
        truth = y[:, k].astype(bool)
        if not truth.any():
            thresholds.append(0.5)
            continue
        pred = probs[:, k][None, :] >= grid[:, None]
        tp = (pred & truth).sum(axis=1)
        f1 = 2 * tp / np.maximum(pred.sum(axis=1) + truth.sum(), 1)
        best = np.flatnonzero(np.isclose(f1, f1.max()))
        thresholds.append(float(grid[best[np.argmin(np.abs(grid[best] - 0.5))]]))
    return thresholds


def selection_scores(logits: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """What a validation evaluation scores during training (at threshold 0.5): `accuracy` is the subset
    accuracy (every label of the text right), `macro_f1` the mean F1 over labels."""
    from sklearn.metrics import f1_score

    pred = np.asarray(logits) >= 0
    y = np.asarray(y).astype(bool)
    return {"accuracy": float((pred == y).all(axis=1).mean()),
            "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0))}


def binary_pairs(probs: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (text, label) decision as a binary prediction: (N*K, 2) probabilities [1-p, p] and 0/1
    truths, for the calibration scores."""
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    return np.stack([1 - p, p], axis=1), np.asarray(y).astype(np.int64).reshape(-1)


def multilabel_metrics(y: np.ndarray, probs: np.ndarray, classes: Sequence[str],
                       thresholds: Sequence[float] | None) -> dict:
    """Micro/macro/samples F1, subset accuracy (= `accuracy`), Hamming loss, per-label precision, recall,
    F1 and support, and the calibration of the (text, label) decisions: `loss` = `log_loss` (mean binary
    cross-entropy), `brier`, `ece` and `reliability`."""
    from sklearn.metrics import f1_score, hamming_loss, precision_recall_fscore_support

    from llmclf.training.calibration import calibration_scores, reliability_bins

    y = np.asarray(y).astype(bool)
    pred = decide_sets(probs, thresholds) if len(y) else np.zeros_like(y)
    precision, recall, f1, support = precision_recall_fscore_support(y, pred, zero_division=0)
    pairs, truth = binary_pairs(probs, y)
    scores = calibration_scores(pairs, truth) if len(y) else {"log_loss": float("nan"), "brier": float("nan"),
                                                              "ece": float("nan")}
    count, confidence, accuracy = reliability_bins(pairs, truth)
    as_list = lambda a: [None if np.isnan(v) else float(v) for v in a]  # noqa: E731 (JSON has no NaN)
    average = lambda how: float(f1_score(y, pred, average=how, zero_division=0)) if len(y) else float("nan")  # noqa: E731
    return {
        "n": len(y), "multi_label": True,
        "accuracy": float((pred == y).all(axis=1).mean()) if len(y) else float("nan"),
        "subset_accuracy": float((pred == y).all(axis=1).mean()) if len(y) else float("nan"),
        "micro_f1": average("micro"), "macro_f1": average("macro"), "samples_f1": average("samples"),
        "hamming_loss": float(hamming_loss(y, pred)) if len(y) else float("nan"),
        "loss": scores["log_loss"],
        "per_class": {label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                      for label, p, r, f, s in zip(classes, precision, recall, f1, support, strict=True)},
        "labels": list(classes),
        "thresholds": None if thresholds is None else dict(zip(classes, map(float, thresholds), strict=True)),
        "mean_labels": {"true": float(y.sum(axis=1).mean()) if len(y) else float("nan"),
                        "predicted": float(pred.sum(axis=1).mean()) if len(y) else float("nan")},
        **scores,
        "reliability": {"bins": len(count), "count": count.tolist(), "confidence": as_list(confidence),
                        "accuracy": as_list(accuracy)},
    }


@dataclass
class LabelThresholds:
    """A multi-label model's decision: a threshold per label (columns in the model's label order) and
    the separator that joins the chosen labels into one `label` string."""

    thresholds: list[float]
    sep: str = DEFAULT_SEP

    def chosen(self, probs: Sequence[float]) -> list[int]:
        """Indices of the labels chosen for one text, the most probable first."""
        row = np.asarray(probs, dtype=np.float64)
        picked = np.flatnonzero(decide_sets(row[None], self.thresholds)[0])
        return sorted(picked.tolist(), key=lambda k: -row[k])

    def names(self, probs: np.ndarray, classes: Sequence[str]) -> list[str]:
        """The joined label string of each row of `probs` (labels in the model's order)."""
        chosen = decide_sets(probs, self.thresholds)
        return [self.sep.join(c for c, on in zip(classes, row, strict=True) if on) for row in chosen]

    def to_config(self, classes: Sequence[str]) -> dict:
        return {"label_sep": self.sep, "thresholds": dict(zip(classes, self.thresholds, strict=True))}

    @classmethod
    def from_config(cls, config: dict, classes: Sequence[str], where: str) -> LabelThresholds:
        from llmclf.errors import ConfigError

        thresholds = config.get("thresholds") or {}
        if set(thresholds) != set(classes) or not all(0.0 <= float(t) <= 1.0 for t in thresholds.values()):
            raise ConfigError(f"{where}: multi_label thresholds {thresholds} do not give one threshold in [0, 1] "
                              f"to each label {list(classes)}")
        return cls([float(thresholds[c]) for c in classes], str(config.get("label_sep") or DEFAULT_SEP))


# --- splitting ------------------------------------------------------------------------------------

def iterative_split(sets: Sequence[Sequence[str]], ratios: Sequence[float], seed: int = 123) -> list[list[int]]:
    """Row indices of each part, stratified by label: iterative stratification (Sechidis, Tsoumakas,
    Vlahavas, ECML PKDD 2011). The label with the fewest unassigned rows goes first; each of its rows
    goes to the part that still wants most of that label (ties: most rows wanted, then random). Part
    sizes follow `ratios` approximately. Afterwards every label is made to occur in the first part
    (train): a label that landed only elsewhere has one of its rows moved there."""
    rng = np.random.default_rng(seed)
    n = len(sets)
    active = [j for j, r in enumerate(ratios) if r > 0]
    wanted_rows = np.array([r * n for r in ratios], dtype=np.float64)
    counts: dict[str, int] = {}
    for names in sets:
        for name in names:
            counts[name] = counts.get(name, 0) + 1
    wanted = {name: np.array([r * c for r in ratios], dtype=np.float64) for name, c in counts.items()}
    order = rng.permutation(n).tolist()
    left: dict[str, list[int]] = {name: [] for name in counts}
    for i in order:
        for name in sets[i]:
            left[name].append(i)
    parts: list[list[int]] = [[] for _ in ratios]
    done = np.zeros(n, dtype=bool)
    while True:
        remaining = {name: [i for i in rows if not done[i]] for name, rows in left.items()}
        remaining = {name: rows for name, rows in remaining.items() if rows}
        if not remaining:
            break
        fewest = min(len(rows) for rows in remaining.values())
        name = sorted(name for name, rows in remaining.items() if len(rows) == fewest)[0]
        left = remaining
        for i in remaining[name]:
            key = [(wanted[name][j], wanted_rows[j], rng.random()) for j in active]
            j = active[max(range(len(active)), key=lambda a: key[a])]
            parts[j].append(i)
            done[i] = True
            wanted_rows[j] -= 1
            for other in sets[i]:
                wanted[other][j] -= 1
    if ratios[0] > 0:
        for name in sorted(counts):
            if not any(name in sets[i] for i in parts[0]):
                j, i = next((j, i) for j in range(1, len(parts)) for i in parts[j] if name in sets[i])
                parts[j].remove(i)
                parts[0].append(i)
    return parts


# --- plots ----------------------------------------------------------------------------------------

def plot_per_label(metrics: dict, path: str | os.PathLike) -> Path:
    """Precision, recall and F1 of each label (grouped bars) with its support, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llmclf.loaders.tensors import atomic_path

    labels = metrics["labels"]
    per = metrics["per_class"]
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(4.5, 0.9 * len(labels) + 2), 3.5))
    for k, what in enumerate(("precision", "recall", "f1")):
        ax.bar(x + (k - 1) * 0.27, [per[label][what] for label in labels], width=0.27, label=what)
    ax.set_xticks(x, [f"{label}\n(n={per[label]['support']})" for label in labels], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Score")
    ax.set_title(f"Per label: micro-F1 {metrics['micro_f1']:.3f}, macro-F1 {metrics['macro_f1']:.3f}")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=150)
    plt.close(fig)
    return Path(path)


def metrics_lines(metrics: dict) -> list[str]:
    """`llmclf evaluate`'s report of multi-label metrics."""
    lines = [f"subset accuracy {metrics['subset_accuracy'] * 100:.2f}%  micro-F1 {metrics['micro_f1']:.4f}  "
             f"macro-F1 {metrics['macro_f1']:.4f}  samples-F1 {metrics['samples_f1']:.4f}  "
             f"Hamming loss {metrics['hamming_loss']:.4f}  n={metrics['n']}",
             f"log-loss {metrics['log_loss']:.4f} (binary, per text and label)  ECE {metrics['ece']:.4f}  "
             f"labels per text: {metrics['mean_labels']['true']:.2f} true, {metrics['mean_labels']['predicted']:.2f} "
             "predicted"]
    thresholds = metrics.get("thresholds") or {}
    for label, m in metrics["per_class"].items():
        lines.append(f"  {label:15s} precision {m['precision']:.3f}  recall {m['recall']:.3f}  f1 {m['f1']:.3f}  "
                     f"support {m['support']}  threshold {thresholds.get(label, 0.5):.2f}")
    return lines
