"""Classification metrics (scikit-learn) and the confusion-matrix plot."""

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
