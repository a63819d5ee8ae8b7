"""How the blend's members are combined, in domain and out: the defaults' members scored under other rules.

Trains `llmclf train`'s defaults on each data set of `bench_robustness.py` (its splits and cross-domain
sets), keeps what the blend's weights were fitted on (the members' out-of-fold + validation
log-probabilities, as `fit_blend_weights` receives them) and the members' log-probabilities of the test
and both cross-domain sets' texts, then scores each rule on all four:

- `log, fitted`: the blend as trained (class log-probabilities weighted by `fit_blend_weights`);
- `log, equal`: the same with equal weights;
- `log, calibrated`: each member's temperature fitted on the out-of-fold scores, then equal weights;
- `mean, fitted` / `mean, equal` / `mean, calibrated`: the members' probabilities averaged instead
  (a mixture, fitted by log-loss on the out-of-fold scores, or equal).

    python bench/bench_blend_rules.py --datasets sms,ag_news [--scores runs/blend-rules]

`--scores DIR` keeps each data set's captured scores in DIR/NAME.npz and reuses them (no training) when
they are there. Prints accuracy (out-of-fold, test, cross-domain, cross-domain 2) and out-of-fold log-loss per rule.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from bench_robustness import DATASETS, DEFAULT_BACKBONE, SECOND_CROSS, SEED, SHARED, cpu_name
from scipy.optimize import minimize
from scipy.special import log_softmax, softmax

SETS = ("oof", "test", "cross", "cross2")


def capture(name: str) -> dict[str, np.ndarray]:
    """Train the defaults on `name`; the members' log-probabilities (`{set}_part{i}`) and labels per set."""
    import llmclf.engines.base as base
    from llmclf.classifier import make_classifier

    fitted_on: list[tuple[list[np.ndarray], np.ndarray]] = []
    fit_blend_weights = base.fit_blend_weights

    def recording(parts, labels, *args, **kwargs):
        fitted_on.append(([np.asarray(p) for p in parts], np.asarray(labels)))
        return fit_blend_weights(parts, labels, *args, **kwargs)

    base.fit_blend_weights = recording  # the last call fits the weights (the first: validation alone)
    try:
        data, cross = DATASETS[name](SHARED, SEED)
        clf = make_classifier(DEFAULT_BACKBONE)
        clf.fit(data["train"], data["validation"], progress=False)
    finally:
        base.fit_blend_weights = fit_blend_weights
    parts, labels = fitted_on[-1]
    out = {f"oof_part{i}": p for i, p in enumerate(parts)} | {"oof_labels": labels}
    for test, texts in (("test", data["test"]), ("cross", cross), ("cross2", SECOND_CROSS[name](SHARED, SEED))):
        lm = np.log(np.clip(clf._text_probabilities(texts.texts, 32, dropout=False), 1e-12, 1.0))
        for i, p in enumerate([lm, *clf._blend_scores(texts.texts)]):
            out[f"{test}_part{i}"] = p
        out[f"{test}_labels"] = np.array([list(clf.classes_).index(label) for label in texts.labels])
    return out


def log_loss(log_probs: np.ndarray, y: np.ndarray) -> float:
    return float(-log_softmax(log_probs, axis=1)[np.arange(len(y)), y].mean())


def rules(parts: list[np.ndarray], y: np.ndarray) -> dict[str, object]:
    """Each rule: members' log-probabilities -> blended log-probabilities, fitted on `parts`, `y` (out of fold)."""
    from llmclf.ngrams import fit_blend_weights

    weights = fit_blend_weights(parts, y)
    temperatures = [minimize(lambda t, p=p: log_loss(p * t[0], y), [1.0], bounds=[(1e-3, 100.0)]).x[0]
                    for p in parts]

    def mixture_loss(a: np.ndarray) -> float:
        mixed = np.tensordot(softmax(a), np.stack([softmax(p, axis=1) for p in parts]), axes=1)
        return float(-np.log(np.clip(mixed[np.arange(len(y)), y], 1e-12, 1.0)).mean())

    shares = softmax(minimize(mixture_loss, np.zeros(len(parts))).x)

    def mean(ps, w):
        return np.log(np.clip(np.tensordot(w, np.stack([softmax(p, axis=1) for p in ps]), axes=1), 1e-12, 1.0))

    equal = np.full(len(parts), 1.0 / len(parts))
    return {"log, fitted": lambda ps: sum(w * p for w, p in zip(weights, ps, strict=True)),
            "log, equal": lambda ps: sum(ps),
            "log, calibrated": lambda ps: sum(t * p for t, p in zip(temperatures, ps, strict=True)),
            "mean, fitted": lambda ps: mean(ps, shares),
            "mean, equal": lambda ps: mean(ps, equal),
            "mean, calibrated": lambda ps: mean([t * p for t, p in zip(temperatures, ps, strict=True)], equal)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="sms,ag_news,imdb")
    parser.add_argument("--scores", type=Path, help="keep / reuse the captured scores here (NAME.npz)")
    args = parser.parse_args()
    print(f"machine: {cpu_name()}", flush=True)
    for name in args.datasets.split(","):
        path = args.scores / f"{name}.npz" if args.scores else None
        if path is not None and path.is_file():
            scores = dict(np.load(path))
        else:
            scores = capture(name)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                np.savez(path, **scores)
        members = len([k for k in scores if k.startswith("oof_part")])
        sets = {s: ([scores[f"{s}_part{i}"] for i in range(members)], scores[f"{s}_labels"]) for s in SETS}
        accuracy = lambda log_probs, y: 100.0 * float((log_probs.argmax(axis=1) == y).mean())  # noqa: E731
        print(f"\n== {name}: accuracy % out of fold / test / cross-domain / cross-domain 2; out-of-fold log-loss")
        for i, member in enumerate(("language model", "n-grams", "sentence encoder")[:members]):
            print(f"  {member + ' alone':22s} " + " / ".join(f"{accuracy(ps[i], y):6.2f}" for ps, y in sets.values()))
        for rule, blend in rules(*sets["oof"]).items():
            print(f"  {rule:22s} " + " / ".join(f"{accuracy(blend(ps), y):6.2f}" for ps, y in sets.values())
                  + f"   {log_loss(blend(sets['oof'][0]), sets['oof'][1]):.4f}")


if __name__ == "__main__":
    main()
