"""bfloat16 inference with weight copies made once (`inference_autocast`) against plain autocast, which
casts every float32 Linear weight again at each forward pass.

Loads a trained classifier in bfloat16 and times `predict_proba` on SMS texts in one process, the two
ways interleaved `--repeats` times (this VM's speed drifts, so only same-run ratios mean anything):
batches of 32 texts (like `predict`) and requests of 8 texts (like a server's micro-batches). Prints
each round and the medians, and checks that both ways give the same probabilities.

    python bench/bench_weight_copies.py --model runs/bench_inference/smollm2 [--repeats 5]

(`bench/bench_inference.py` trains runs/bench_inference/smollm2 and gpt2-small.)
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import numpy as np
from bench_serve import sms_texts
from bench_training_loop import cpu_name

import llmclf.training.classifier as training
from llmclf.classifier import load_classifier
from llmclf.runtime import autocast, inference_autocast


@contextlib.contextmanager
def plain_autocast(model, device, dtype):
    """What inference did before: autocast alone."""
    with autocast(device, dtype):
        yield


def texts_per_second(clf, batches: list[list[str]], batch_size: int) -> float:
    start = time.perf_counter()
    for texts in batches:
        clf.predict_proba(texts, batch_size)
    return sum(map(len, batches)) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a trained scratch-engine classifier directory")
    parser.add_argument("--texts", type=int, default=320, help="texts per round (in batches of 32)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    clf = load_classifier(args.model, precision="bfloat16")
    texts = sms_texts()[: args.texts]
    workloads = {"batch 32": ([texts], 32), "requests of 8": ([texts[i:i + 8] for i in range(0, 96, 8)], 32)}
    ways = {"autocast": plain_autocast, "weight copies": inference_autocast}

    probabilities = {}
    for name, way in ways.items():
        training.inference_autocast = way
        probabilities[name] = clf.predict_proba(texts[:64], 32)  # also the warm-up
    same = np.array_equal(*probabilities.values())

    results: dict[tuple[str, str], list[float]] = {}
    for round_ in range(args.repeats):
        for name, way in ways.items():
            training.inference_autocast = way
            for workload, (batches, batch_size) in workloads.items():
                results.setdefault((name, workload), []).append(texts_per_second(clf, batches, batch_size))
        print(f"round {round_ + 1}: " + ", ".join(f"{n} {w} {r[-1]:.1f}" for (n, w), r in results.items()),
              flush=True)
    print(f"{args.model.name} in bfloat16 on {cpu_name()}, texts/s, median of {args.repeats}:")
    for workload in workloads:
        before, after = (statistics.median(results[(name, workload)]) for name in ways)
        print(f"  {workload:14s} autocast {before:6.1f}   weight copies {after:6.1f}   ({after / before:.2f}x)")
    print(f"  same probabilities: {same}")


if __name__ == "__main__":
    main()
