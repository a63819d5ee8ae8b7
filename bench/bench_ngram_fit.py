"""The n-gram member's fit: on every hashed column, or on the columns of the n-grams kept (what `NgramModel` does).

`NgramModel.fit_counts` fits its logistic regression on the columns whose n-grams pass `MIN_DF` only (the
others' coefficients stay 0 under the L2 penalty either way). This times both fits on each data set's
training split (`bench_robustness.py`'s splits) and prints the largest coefficient difference.

    python bench/bench_ngram_fit.py [--datasets sms,ag_news,imdb]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from bench_robustness import DATASETS, SEED, SHARED, cpu_name
from sklearn.linear_model import LogisticRegression

from llmclf.data.classification import label_order
from llmclf.ngrams import C, NgramModel, _tfidf, ngram_counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="sms,ag_news,imdb")
    args = parser.parse_args()
    print(f"machine: {cpu_name()}")
    print("data set   texts  kept columns / all   every column s   kept columns s   max |coef difference|")
    for name in args.datasets.split(","):
        train = DATASETS[name](SHARED, SEED)[0]["train"]
        classes = label_order(train.labels)
        y = np.array([classes.index(label) for label in train.labels])
        counts = ngram_counts(train.texts)
        begin = time.perf_counter()
        model = NgramModel.fit_counts(counts, y, len(classes))
        kept_seconds = time.perf_counter() - begin
        x = _tfidf(counts, model.idf.astype(np.float64))
        begin = time.perf_counter()
        every = LogisticRegression(C=C, max_iter=2000).fit(x, y)
        every_seconds = time.perf_counter() - begin
        ours = model.coef[1:] if len(classes) == 2 else model.coef
        print(f"{name:9s} {len(train):6d}  {np.count_nonzero(model.idf):7d} / {x.shape[1]}   {every_seconds:14.2f}"
              f"   {kept_seconds:14.2f}   {float(np.abs(every.coef_ - ours).max()):.1e}", flush=True)


if __name__ == "__main__":
    main()
