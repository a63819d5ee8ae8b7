"""How well `llmclf tune` sizes a backbone's frozen pass before running it.

For each backbone, over train + validation of each data set (`bench_robustness`'s seeded splits):
the load time; the pass sized from the previous backbone's speed (block parameters x padded tokens, what
`tune` uses to skip a backbone before timing it); the probe (`FrozenFeatures.estimate_seconds`: its own
seconds and its estimate); and the whole pass, measured.

    python bench/bench_tune_estimate.py --datasets imdb --backbones gemma3-270m,smollm2-135m

Prints one row per backbone and data set.
"""

from __future__ import annotations

import argparse
import time

from bench_backbones import SHARED
from bench_robustness import DATASETS, SEED, cpu_name

from llmclf.data.classification import label_order
from llmclf.tuning import FrozenFeatures, _PassSpeed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="imdb")
    parser.add_argument("--backbones", default="gemma3-270m,smollm2-135m")
    args = parser.parse_args()
    print(f"CPU: {cpu_name()}")
    print(f"{'data':8} {'backbone':14} {'load s':>7} {'sized s':>8} {'probe s':>8} {'estimate s':>11} {'pass s':>7}")
    for name in args.datasets.split(","):
        data = DATASETS[name](SHARED, SEED)[0]
        texts = data["train"].texts + data["validation"].texts
        labels = data["train"].labels + data["validation"].labels
        classes = label_order(labels)
        speed = None
        for spec in args.backbones.split(","):
            features = FrozenFeatures(spec, texts, [classes.index(y) for y in labels], classes, seed=SEED,
                                      progress=False, defer=True)
            sized = speed.seconds(features.block_params, features.padded_tokens) if speed else float("nan")
            start = time.perf_counter()
            estimate = features.estimate_seconds()
            probe = time.perf_counter() - start
            features.compute()
            speed = _PassSpeed.of(features, features.seconds)
            print(f"{name:8} {spec:14} {features.load_seconds:7.1f} {sized:8.1f} {probe:8.1f} {estimate:11.1f} "
                  f"{features.seconds:7.1f}", flush=True)
            del features


if __name__ == "__main__":
    main()
