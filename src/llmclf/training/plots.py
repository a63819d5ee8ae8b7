"""Training plots as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # file output only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from llmclf.loaders.tensors import atomic_path  # noqa: E402


def plot_values(epochs_seen: Sequence[float], examples_seen: Sequence[float], train_values: Sequence[float],
                val_values: Sequence[float], path: str | os.PathLike, label: str = "loss",
                examples_label: str = "Examples seen") -> Path:
    """The book's plot: training and validation `label` against epochs, with a second x-axis
    for examples (or tokens) seen. Written as PNG to `path`."""
    fig, ax1 = plt.subplots(figsize=(5, 3))
    ax1.plot(epochs_seen, train_values, label=f"Training {label}")
    ax1.plot(epochs_seen, val_values, linestyle="-.", label=f"Validation {label}")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel(label.capitalize())
    ax1.legend()
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2 = ax1.twiny()
    ax2.plot(examples_seen, train_values, alpha=0)  # invisible: aligns the second axis' ticks
    ax2.set_xlabel(examples_label)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=150)
    plt.close(fig)
    return Path(path)


def plot_series(series: dict[str, Sequence[tuple[float, float]]], path: str | os.PathLike, xlabel: str,
                ylabel: str) -> Path:
    """Several named (x, y) curves on one set of axes (e.g. training loss logged every few steps
    and validation loss at each evaluation). Written as PNG to `path`."""
    fig, ax = plt.subplots(figsize=(5, 3))
    for i, (name, points) in enumerate(series.items()):
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, linestyle="-" if i == 0 else "-.", marker="o" if len(xs) < 20 else None, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=150)
    plt.close(fig)
    return Path(path)
