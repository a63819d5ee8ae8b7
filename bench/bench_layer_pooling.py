"""Which layers to pool: a frozen backbone's mean-pooled states of every block, read by a linear model.

For each data set (`bench_robustness`'s seeded splits and cross-domain sets), every text goes once
through the frozen backbone (in the precision `train` uses); after each block the states are normed
(the final norm) and mean-pooled over the text's tokens. A logistic regression (standardised
features, C chosen on validation) is fitted on the training split for: each block alone; the mean over
all blocks; the mean over the blocks from a third of the depth on; the mean over the second half;
and the last block (what `pooling=mean` reads today).

    python bench/bench_layer_pooling.py --datasets sms,imdb [--backbone gemma3-270m]

Prints validation, in-domain test and cross-domain accuracy per row.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from bench_backbones import SHARED
from bench_robustness import DATASETS, SEED, cpu_name
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from llmclf.config import DEFAULT_BACKBONE
from llmclf.data.classification import collate, label_order
from llmclf.models.heads import pool
from llmclf.runtime import autocast
from llmclf.tuning import FrozenFeatures

C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1)


@torch.no_grad()
def pooled_per_block(features: FrozenFeatures, batch_size: int = 16) -> np.ndarray:
    """(texts, blocks, dim): each text's mean over tokens of final_norm(states after block l)."""
    model, ids = features.backbone.eval(), features.encoded.ids
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out = None
    for begin in range(0, len(order), batch_size):
        idx = order[begin:begin + batch_size]
        x, mask = collate([ids[i] for i in idx], features.tokenizer.pad_id)
        with autocast(features.device, features.dtype):
            hidden, inputs = model.embed(x, mask)
            pooled = []
            for layer, block in enumerate(model.trf_blocks):
                hidden = block(hidden, inputs, None, layer)
                pooled.append(pool(model.final_norm(hidden), mask, "mean").float())
        batch = torch.stack(pooled, 1).numpy()
        if out is None:
            out = np.zeros((len(ids), *batch.shape[1:]), dtype=np.float32)
        out[idx] = batch
    return out


def score(x: np.ndarray, y: np.ndarray, parts: dict[str, slice]) -> tuple[float, float, float, float]:
    """(C, validation, test, cross-domain accuracy) of the logistic regression chosen on validation."""
    scaled = StandardScaler().fit(x[parts["train"]]).transform(x)
    best = None
    for c in C_GRID:
        model = LogisticRegression(C=c, max_iter=3000).fit(scaled[parts["train"]], y[parts["train"]])
        val = float((model.predict(scaled[parts["validation"]]) == y[parts["validation"]]).mean())
        if best is None or val > best[1]:
            best = (c, val, model)
    c, val, model = best
    return c, val, *(float((model.predict(scaled[parts[k]]) == y[parts[k]]).mean()) for k in ("test", "cross"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="sms,imdb")
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE)
    args = parser.parse_args()
    print(f"CPU: {cpu_name()}; backbone {args.backbone}")
    for name in args.datasets.split(","):
        data, cross = DATASETS[name](SHARED, SEED)
        splits = {"train": data["train"], "validation": data["validation"], "test": data["test"], "cross": cross}
        texts = [t for split in splits.values() for t in split.texts]
        labels = [y for split in splits.values() for y in split.labels]
        classes = label_order(labels)
        y = np.array([classes.index(label) for label in labels])
        bounds = np.cumsum([0, *(len(split) for split in splits.values())])
        parts = {k: slice(int(bounds[i]), int(bounds[i + 1])) for i, k in enumerate(splits)}
        start = time.perf_counter()
        features = FrozenFeatures(args.backbone, texts, y.tolist(), classes, seed=SEED, progress=False, defer=True)
        per_block = pooled_per_block(features)
        n = per_block.shape[1]
        print(f"\n== {name}: {len(texts)} texts through {n} blocks in {time.perf_counter() - start:.0f} s")
        rows = {f"block {b + 1}": per_block[:, b] for b in range(n)}
        rows["mean of all blocks"] = per_block.mean(1)
        for first in (n // 3, n // 2):
            rows[f"mean of blocks {first + 1}-{n}"] = per_block[:, first:].mean(1)
        rows["last block (today)"] = per_block[:, -1]
        for label, x in rows.items():
            c, val, test, cross_acc = score(x, y, parts)
            print(f"{label:24} C={c:<6} validation {val * 100:6.2f}  test {test * 100:6.2f}  "
                  f"cross-domain {cross_acc * 100:6.2f}", flush=True)


if __name__ == "__main__":
    main()
