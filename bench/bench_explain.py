"""What explanations cost: texts/s of prediction alone, with integrated gradients (`predict --explain`,
`--explain-steps` points) and with occlusion, for one classifier directory, on SMS Spam messages.

Each figure is the same texts, in the same process, after one warm-up text; prediction runs them in
batches of `--batch-size`, explanations one text at a time (each text's integration points are the
batch). With `--png`, the attribution picture of `--text` (default: the course's spam message) is
written too (the README's picture: docs/explain_spam.png).

    python bench/bench_explain.py --model runs/demo/spam [--texts 32] [--steps 32] [--png docs/explain_spam.png]
    python bench/bench_explain.py            # the tiny-model fallback: bench_serve's GPT-2-small-sized model
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from bench_robustness import cpu_name
from bench_serve import build_classifier, sms_texts

SPAM = "You are a winner you have been specially selected to receive $1000 cash or a $2000 award."


def rate(fn, n: int) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="classifier directory (default: bench_serve's gpt2-small)")
    parser.add_argument("--texts", type=int, default=32, help="SMS messages to time (the first N)")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--png", type=Path, help="write the attribution picture of --text here")
    parser.add_argument("--text", default=SPAM)
    args = parser.parse_args()

    from llmclf.classifier import load_classifier
    from llmclf.explain import explain, plot_explanation

    model = args.model or build_classifier("gpt2-small")
    clf = load_classifier(model, precision="float32")
    texts = sms_texts()[: args.texts]
    clf.explain(texts[:1], steps=args.steps)  # warm-up
    predict = rate(lambda: clf.predict_proba(texts, batch_size=args.batch_size), len(texts))
    ig = rate(lambda: explain(clf, texts, steps=args.steps, batch_size=args.batch_size), len(texts))
    occ = rate(lambda: explain(clf, texts, method="occlusion", batch_size=args.batch_size), len(texts))
    print(f"model {model} ({clf.engine} engine, {clf.info()['backbone']}); {len(texts)} SMS messages; "
          f"{cpu_name()}, {torch.get_num_threads()} threads")
    print(f"  predict:                      {predict:8.2f} texts/s")
    print(f"  predict --explain ({args.steps} steps): {ig:8.2f} texts/s  ({predict / ig:.0f}x slower)")
    print(f"  occlusion:                    {occ:8.2f} texts/s  ({predict / occ:.0f}x slower)")
    if args.png:
        probability = float(clf.predict_proba([args.text]).max())
        e = explain(clf, [args.text], steps=args.steps)[0]
        print(f"  {args.text!r}: {e.label}, delta {e.delta:+.4f}; "
              + " ".join(f"{t.text.strip()}({t.attribution:+.2f})" for t in e.tokens))
        print(f"  picture: {plot_explanation(args.text, e, args.png, probability)}")


if __name__ == "__main__":
    main()
