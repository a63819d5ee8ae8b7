"""Fine-tuning speed with and without cached frozen layers (GPT-2 small, SMS spam course split).

The frozen blocks below `--trainable last-block` are run once per text instead of every step.
GPT-2 small is randomly initialised here (no pretrained GPT-2 weights offline), which does not
change the amount of computation. Prints wall time per run and the speed-up.

    python bench/bench_classifier_cache.py --data DIR_WITH_SPLIT [--epochs 1]
"""

from __future__ import annotations

import argparse
import time

from llmclf.classifier import TextClassifier
from llmclf.data.classification import read_labelled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="directory with train.csv and validation.csv")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    train = read_labelled(f"{args.data}/train.csv")
    val = read_labelled(f"{args.data}/validation.csv")
    times = {}
    for cache in (True, False):
        clf = TextClassifier("gpt2-small", trainable="last-block", epochs=args.epochs, precision=args.precision,
                             cache_frozen=cache, log_every=10_000, model_options={"random_init": True})
        start = time.perf_counter()
        clf.fit(train, val, progress=False)
        times[cache] = time.perf_counter() - start
        print(f"cache_frozen={cache!s:5s}  {times[cache]:7.1f} s  val accuracy {clf.val_metrics_['accuracy']:.4f}",
              flush=True)
    print(f"speed-up from caching: {times[False] / times[True]:.2f}x "
          f"({len(train)} training texts, {args.epochs} epoch(s), precision {args.precision})")


if __name__ == "__main__":
    main()
