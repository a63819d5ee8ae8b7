"""Classification metrics (scikit-learn), the confusion-matrix plot and the reliability diagram."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from llmclf.loaders.tensors import atomic_path


def classification_metrics(y_true: list[int], y_pred: list[int], labels: list[str],
                           loss: float | None = None) -> dict:
    """Accuracy, per-class precision/recall/F1/support, macro-F1, confusion matrix, loss and n."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support  # slow import

    classes = list(range(len(labels)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=classes, zero_division=0)
    return {
        "n": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(np.mean(f1)),
        "loss": loss,
        "per_class": {label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                      for label, p, r, f, s in zip(labels, precision, recall, f1, support, strict=True)},
        "labels": labels,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=classes).tolist(),
    }


def classification_scores(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 over every class (F1 0 for a class never predicted nor present): what
    both engines' validation evaluations score (with the unweighted loss) for `--select-by`."""
    from sklearn.metrics import accuracy_score, f1_score  # slow import, not needed before training

    logits = np.asarray(logits)
    if np.ndim(labels) == 2:  # multi-label: 0/1 rows, one sigmoid per label
        from llmclf.multilabel import selection_scores

        return selection_scores(logits, labels)
    preds = logits.argmax(axis=-1)
    classes = list(range(logits.shape[-1]))
    return {"accuracy": float(accuracy_score(labels, preds)),
            "macro_f1": float(f1_score(labels, preds, labels=classes, average="macro", zero_division=0))}


def plot_confusion_matrix(matrix: list[list[int]], labels: list[str], path: str | os.PathLike) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    size = max(3.5, 0.8 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(np.array(matrix), display_labels=labels).plot(ax=ax, colorbar=False, cmap="Blues")
    ax.set_title("Confusion matrix")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=150)
    plt.close(fig)
    return Path(path)


def plot_calibration(reliability: dict, path: str | os.PathLike, title: str = "") -> Path:
    """The reliability diagram (accuracy against mean confidence of the top label, per equal-width
    confidence bin, beside the diagonal of perfect calibration) above the confidence histogram, from
    the `reliability` entry of the evaluation metrics. Written as PNG to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = reliability["bins"]
    edges = np.linspace(0.0, 1.0, bins + 1)
    centers, width = (edges[:-1] + edges[1:]) / 2, 1.0 / bins
    count = np.asarray(reliability["count"])
    nan = float("nan")
    accuracy = np.array([nan if v is None else v for v in reliability["accuracy"]], dtype=float)
    confidence = np.array([nan if v is None else v for v in reliability["confidence"]], dtype=float)
    used = count > 0
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(4.5, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfectly calibrated")
    top.bar(centers[used], accuracy[used], width=width, edgecolor="black", alpha=0.8, label="accuracy")
    top.bar(centers[used], confidence[used] - accuracy[used], bottom=accuracy[used], width=width, color="tab:red",
            alpha=0.3, edgecolor="tab:red", label="gap to confidence")
    top.set_ylabel("Accuracy")
    top.set_ylim(0, 1)
    top.legend(loc="upper left", fontsize=8)
    top.set_title(title or "Reliability diagram")
    bottom.bar(centers, count, width=width, edgecolor="black", color="tab:blue")
    bottom.set_xlabel("Confidence (probability of the predicted label)")
    bottom.set_ylabel("Texts")
    bottom.set_xlim(0, 1)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=150)
    plt.close(fig)
    return Path(path)
