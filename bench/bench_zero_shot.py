"""Zero-shot and few-shot accuracy and speed of an instruction-tuned LM (`llmclf.zero_shot`), nothing trained.

Data: the test splits of `bench_backbones.py` (seed 123: SMS course split, AG News 4 topics, IMDB
balanced), the first `--limit` texts of each (default 200); few-shot examples come from the same
split's training part (K per class, one seeded draw shared by every text). Label names: SMS
"ham,spam", AG News its four topic names, IMDB "positive,negative". Prints accuracy and texts/s
(wall time of `predict_proba` over the texts, the shared prompt's one pass excluded and printed apart),
each without and with contextual calibration (`calibrate="content-free"`), from the same pass.

    python bench/bench_zero_shot.py [--model smollm2-135m] [--datasets sms,ag_news,imdb] [--shots 0,4,16]
        [--limit 200] [--score both] [--shot-selection random] [--json F] [--words 'sms:ham=not spam']
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_backbones import DATASETS, SHARED  # noqa: E402
from bench_robustness import cpu_name  # noqa: E402

from llmclf.data.classification import LabelledTexts, label_order  # noqa: E402
from llmclf.zero_shot import ZeroShotClassifier, label_words  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--datasets", default="sms,ag_news,imdb")
    parser.add_argument("--shots", default="0,4,16")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--score", default="both", help="mean, sum, or both (both from one pass)")
    parser.add_argument("--shot-selection", default="random", help="random (one draw) or nearest (per text)")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--words", action="append", default=[], metavar="DATASET:NAME=WORDS,...",
                        help="what the model reads for a data set's labels, e.g. 'sms:ham=not spam' (repeatable)")
    args = parser.parse_args()
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; model {args.model}, "
          f"precision {args.precision}", flush=True)
    results = {}
    for name in args.datasets.split(","):
        data = DATASETS[name](SHARED, 123)
        test = LabelledTexts(data["test"].texts[: args.limit], data["test"].labels[: args.limit], f"{name} test")
        labels = label_order(data["train"].labels)
        words = dict(label_words(x) for spec in args.words if spec.startswith(f"{name}:")
                     for x in spec.split(":", 1)[1].split(","))
        entries = [f"{label}={words[label]}" if label in words else label for label in labels]
        print(f"{name}: labels {entries}", flush=True)
        for shots in (int(k) for k in args.shots.split(",")):
            scores = ["mean", "sum"] if args.score == "both" else [args.score]
            clf = ZeroShotClassifier(args.model, entries, shots=shots, shot_selection=args.shot_selection,
                                     precision=args.precision)
            start = time.perf_counter()
            clf.fit(data["train"] if shots else None)
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            token_log_probs = clf.label_token_log_probs(test.texts, batch_size=16)
            seconds = time.perf_counter() - start
            gold = np.array([labels.index(x) for x in test.labels])
            for score, calibrate in ((s, c) for s in scores for c in ("none", "content-free")):  # one pass
                probs = clf.probabilities_from(token_log_probs, score, calibrate)
                acc = float((probs.argmax(1) == gold).mean())
                key = (f"{name}/{shots}-shot" + ("/nearest" if shots and args.shot_selection == "nearest" else "")
                       + f"/{score}" + ("/calibrated" if calibrate != "none" else ""))
                results[key] = {"accuracy": acc, "texts_per_second": len(test) / seconds, "n": len(test),
                                "prompt_tokens": len(clf.prefix_ids_) + 1, "prefix_seconds": prefill,
                                "predicted": {lab: int((probs.argmax(1) == i).sum()) for i, lab in enumerate(labels)}}
                print(f"{key:39s} accuracy {acc * 100:6.2f} %  {len(test) / seconds:6.2f} texts/s  "
                      f"(n={len(test)}, shared prompt {len(clf.prefix_ids_) + 1} tokens, {prefill:.1f} s to load "
                      f"and run once; predicted {results[key]['predicted']})", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
