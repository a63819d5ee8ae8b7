"""How well `llmclf inspect` finds labels we know are wrong: flip a fraction of a training split's labels at
random (seeded), inspect the copy, and count the flipped rows among the top-ranked k (k = number flipped),
and among the rows cleanlab flags as issues.

    python bench/bench_label_issues.py --data runs/sms/train.csv --model tfidf --seeds 1,2,3
    python bench/bench_label_issues.py --data runs/sms/train.csv --model smollm2-135m --seeds 1

The split's own label errors (the UCI SMS collection has some) stay in the copy: a top-ranked row that
was not flipped is not necessarily a false alarm.
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np

from llmclf.data.classification import LabelledTexts, label_order, read_labelled
from llmclf.inspect_data import inspect_data


def flip(data: LabelledTexts, fraction: float, seed: int) -> tuple[LabelledTexts, set[int]]:
    """A copy with round(fraction * n) labels switched to another class chosen at random."""
    rng = random.Random(seed)
    classes = label_order(data.labels)
    flipped = set(rng.sample(range(len(data)), round(fraction * len(data))))
    labels = [rng.choice([c for c in classes if c != label]) if i in flipped else label
              for i, label in enumerate(data.labels)]
    return LabelledTexts(list(data.texts), labels, f"{data.source} ({fraction:.0%} flipped, seed {seed})"), flipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="runs/sms/train.csv")
    parser.add_argument("--model", default="tfidf")
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()
    data = read_labelled(args.data)
    print(f"{args.data}: {len(data)} rows; model {args.model}; {args.folds} folds; {args.fraction:.0%} flipped")
    print(f"{'seed':>4s} {'flipped':>7s} {'recall@k':>8s} {'issues':>6s} {'issue precision':>15s} "
          f"{'issue recall':>12s} {'seconds':>7s}")
    recalls = []
    for seed in (int(s) for s in args.seeds.split(",")):
        noisy, flipped = flip(data, args.fraction, seed)
        start = time.perf_counter()
        result = inspect_data(noisy, model=args.model, folds=args.folds, seed=123, progress=False)
        seconds = time.perf_counter() - start
        k = len(flipped)
        top = {r["row"] - 1 for r in result.rows[:k]}
        issues = {r["row"] - 1 for r in result.issues}
        recalls.append(len(top & flipped) / k)
        found = len(issues & flipped)
        print(f"{seed:4d} {k:7d} {recalls[-1]:8.3f} {len(issues):6d} {found / max(len(issues), 1):15.3f} "
              f"{found / k:12.3f} {seconds:7.1f}")
    print(f"mean recall@k over {len(recalls)} seed(s): {np.mean(recalls):.3f}")


if __name__ == "__main__":
    main()
