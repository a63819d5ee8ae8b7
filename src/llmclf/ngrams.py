"""The n-gram half of `--ensemble tfidf`: what the TF-IDF baseline sees, inside the classifier.

A logistic regression (scikit-learn) on TF-IDF word 1-2-grams and character 2-5-grams, fitted on
the training texts; its class scores are combined with the language model's by one of two rules
(`--blend`). `log`:

    p(class | text) = softmax(w_lm * log p_lm(class | text) + w_ngram * score_ngram(class | text)
                              [+ w_encoder * score_encoder(class | text)]),

(the last term with `--ensemble tfidf+ENCODER`: `llmclf.sentence_encoder`), the weights fitted by
log-loss on held-out predictions (`fit_blend_weights`: out-of-fold predictions of the training set
plus the validation set where the engine can refit its head on folds, else the validation set alone),
pulled toward equal weights. `mean`: the members' probabilities averaged, equal weights (scikit-learn's
soft voting), nothing fitted. The n-grams are hashed (scikit-learn's
`HashingVectorizer`), so the saved state is four arrays and no vocabulary: `ngrams.safetensors`
(idf, coef, intercept, weights) beside the model, and nothing in it runs code when loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import log_softmax

from llmclf.errors import ConfigError
from llmclf.loaders.tensors import atomic_path

NGRAMS_FILE = "ngrams.safetensors"
N_FEATURES = 2**18  # hashed features per analyzer (word, character)
WORD_NGRAMS = (1, 2)
CHAR_NGRAMS = (2, 5)
MIN_DF = (1, 2)  # n-grams seen in fewer training texts are dropped (word, character), as the baseline does
C = 10.0  # inverse L2 strength of the logistic regression
MAX_WEIGHT = 10.0
BLEND_RULES = ("log", "mean")  # how `combine` uses the weights: on log-probabilities, or a mixture of probabilities
# The blend weights' pull toward equal weights: the mean log-loss over the N texts they are fitted on plus
# (EQUAL_WEIGHTS_PRIOR / N) * ||s - 1/2||^2 on the weights' shares s = w / sum(w) (their scale is free: the
# temperature rescales it anyway). The pull is worth this many texts: it matters on a validation set of a
# hundred texts (0.05 nats per text for one model alone at N = 100), little on a thousand out-of-fold ones.
EQUAL_WEIGHTS_PRIOR = 10.0


def ngram_counts(texts: list[str]):
    """Sparse (texts, 2 * N_FEATURES) n-gram counts: word block, then character block."""
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import HashingVectorizer

    # The hash reads UTF-8: a lone surrogate (e.g. from JSON "\ud800") becomes U+FFFD instead of an error.
    texts = [t.encode("utf-8", "replace").decode("utf-8") for t in texts]
    common = dict(n_features=N_FEATURES, alternate_sign=False, norm=None, dtype=np.float64)
    word = HashingVectorizer(ngram_range=WORD_NGRAMS, **common)
    char = HashingVectorizer(analyzer="char_wb", ngram_range=CHAR_NGRAMS, **common)
    return hstack([word.transform(texts), char.transform(texts)]).tocsr()


def _tfidf(counts, idf: np.ndarray):
    """Sublinear TF x idf, each block L2-normalised (as two `TfidfVectorizer(sublinear_tf=True)`)."""
    from scipy.sparse import hstack
    from sklearn.preprocessing import normalize

    x = counts.copy()
    x.data = 1.0 + np.log(x.data)
    x = x.multiply(idf.reshape(1, -1)).tocsr()
    x.eliminate_zeros()
    return hstack([normalize(x[:, :N_FEATURES]), normalize(x[:, N_FEATURES:])]).tocsr()


@dataclass
class NgramModel:
    """A fitted TF-IDF logistic regression and its blend weights (see the module docstring)."""

    idf: np.ndarray  # (2 * N_FEATURES,): 0 for n-grams dropped by MIN_DF
    coef: np.ndarray  # (classes, 2 * N_FEATURES)
    intercept: np.ndarray  # (classes,)
    weights: np.ndarray  # the blend's: (2,) w_lm, w_ngram, or (3,) with a sentence encoder's, w_encoder
    rule: str = "log"  # one of BLEND_RULES; models saved before the rule existed are "log"

    @classmethod
    def fit(cls, texts: list[str], labels: list[int], n_classes: int) -> NgramModel:
        """The n-gram model of these training texts (label ids in 0..n_classes-1); weights 1, 1."""
        return cls.fit_counts(ngram_counts(texts), labels, n_classes)

    @classmethod
    def fit_counts(cls, counts, labels: list[int] | np.ndarray, n_classes: int) -> NgramModel:
        """`fit` from the texts' `ngram_counts` (rows of one matrix serve every fold of cross-validation)."""
        from sklearn.linear_model import LogisticRegression

        labels = np.asarray(labels).tolist()
        n = counts.shape[0]
        df = np.bincount(counts.indices, minlength=counts.shape[1])
        idf = np.log((1 + n) / (1 + df)) + 1.0  # scikit-learn's smooth idf
        min_df = np.repeat(np.array(MIN_DF), N_FEATURES)
        idf[df < min_df] = 0.0
        # Only the n-grams kept (a tenth of the hashed columns or less) enter the fit: the others' coefficients
        # stay 0 under the L2 penalty anyway, and L-BFGS on the short vectors is 4-8x faster (AG News: 12.6 s -> 1.5 s).
        kept = np.flatnonzero(idf)
        lr = LogisticRegression(C=C, max_iter=2000).fit(_tfidf(counts, idf)[:, kept], labels)
        if list(lr.classes_) != list(range(n_classes)):
            raise ValueError(f"the n-gram model needs every label id 0..{n_classes - 1} in its training data")
        coef, intercept = np.zeros((lr.coef_.shape[0], len(idf))), lr.intercept_
        coef[:, kept] = lr.coef_
        if n_classes == 2:  # scikit-learn's binary form: one row, the score of class 1 over class 0
            coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.array([0.0, intercept[0]])
        as_float32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731 (coef_ may be Fortran-ordered)
        return cls(as_float32(idf), as_float32(coef), as_float32(intercept), np.ones(2, dtype=np.float32))

    def scores(self, texts: list[str]) -> np.ndarray:
        """Class log-probabilities of the n-gram model alone, (len(texts), classes)."""
        x = _tfidf(ngram_counts(texts), self.idf.astype(np.float64))
        return log_softmax(np.asarray(x @ self.coef.T.astype(np.float64)) + self.intercept, axis=1)

    def combine(self, lm_probs: np.ndarray, scores: np.ndarray, *more_scores: np.ndarray) -> np.ndarray:
        """The ensemble's probabilities from the language model's, `scores(texts)` and any other
        member's log-probabilities (the sentence encoder's), one weight each, by `rule`."""
        parts = [np.log(np.clip(lm_probs, 1e-12, 1.0)), scores, *more_scores]
        if len(parts) != len(self.weights):
            raise ValueError(f"the blend has {len(self.weights)} weights, given {len(parts)} members' scores")
        weights = self.weights.astype(np.float64)
        if self.rule == "mean":
            mixed = sum(w * np.exp(log_softmax(part, axis=1)) for w, part in zip(weights, parts, strict=True))
            return (mixed / weights.sum()).astype(np.float32)
        z = sum(w * part for w, part in zip(weights, parts, strict=True))
        return np.exp(log_softmax(z, axis=1)).astype(np.float32)

    def blend(self, lm_probs: np.ndarray, texts: list[str]) -> np.ndarray:
        return self.combine(lm_probs, self.scores(texts))

    def fit_weights(self, lm_probs: np.ndarray, texts: list[str], labels: list[int],
                    prior: float = EQUAL_WEIGHTS_PRIOR) -> NgramModel:
        """Choose (w_lm, w_ngram) by `fit_blend_weights` on these held-out texts; returns self."""
        log_lm = np.log(np.clip(lm_probs, 1e-12, 1.0))
        self.weights = fit_blend_weights([log_lm, self.scores(texts)], labels, prior).astype(np.float32)
        return self

    # --- persistence -------------------------------------------------------------------------

    def save(self, out_dir: str | os.PathLike) -> Path:
        """`out_dir/ngrams.safetensors`, written to a temporary name and renamed."""
        from safetensors.numpy import save_file

        path = Path(out_dir) / NGRAMS_FILE
        arrays = {"idf": self.idf, "coef": self.coef, "intercept": self.intercept, "weights": self.weights}
        with atomic_path(path) as tmp:
            save_file({name: np.ascontiguousarray(a, dtype=np.float32) for name, a in arrays.items()}, str(tmp),
                      metadata={"n_features": str(N_FEATURES), "word_ngrams": "1-2", "char_ngrams": "2-5",
                                "blend": self.rule})
        return path

    @classmethod
    def load(cls, model_dir: str | os.PathLike, n_classes: int, members: int = 2) -> NgramModel:
        """The n-gram model saved in `model_dir`, checked against the classifier's classes and the
        number of the blend's `members` (the language model included)."""
        from safetensors import safe_open

        path = Path(model_dir) / NGRAMS_FILE
        if not path.is_file():
            raise ConfigError(f"{path} is missing: the model's config.json says it was trained with "
                              "--ensemble tfidf; copy the whole model directory")
        with safe_open(str(path), framework="numpy") as f:
            arrays = {name: f.get_tensor(name) for name in f.keys()}
            rule = (f.metadata() or {}).get("blend", "log")
        if rule not in BLEND_RULES:
            raise ConfigError(f"{path}: blend rule {rule!r} is not one of {', '.join(BLEND_RULES)} (metadata "
                              "'blend'); was it written by a newer llmclf?")
        expected = {"idf": (2 * N_FEATURES,), "coef": (n_classes, 2 * N_FEATURES), "intercept": (n_classes,),
                    "weights": (members,)}
        for name, shape in expected.items():
            if name not in arrays or arrays[name].shape != shape:
                found = arrays[name].shape if name in arrays else "missing"
                raise ConfigError(f"{path}: tensor {name!r} should have shape {shape}, found {found}")
        return cls(**{name: arrays[name] for name in expected}, rule=rule)


def fit_blend_weights(parts: list[np.ndarray], labels: list[int] | np.ndarray,
                      prior: float = EQUAL_WEIGHTS_PRIOR) -> np.ndarray:
    """One weight per member in [0, MAX_WEIGHT] minimising the blend's mean log-loss on held-out texts
    (`parts`: each member's class log-probabilities of them, the language model's first; `labels`: their
    label ids), plus (prior / N) * ||s - mean(s)||^2 on their shares s = w / sum(w), toward equal weights,
    and a tiny L2 toward 0 that keeps them bounded."""
    from scipy.optimize import minimize

    y = np.asarray(labels)
    if len(y) == 0:
        return np.ones(len(parts))
    rows = np.arange(len(y))
    pull = prior / len(y)
    stacked = np.stack(parts)  # (members, texts, classes)

    def loss(w: np.ndarray) -> float:
        z = log_softmax(np.tensordot(w, stacked, axes=1), axis=1)
        shares = w / max(w.sum(), 1e-9)
        return float(-z[rows, y].mean() + pull * ((shares - shares.mean()) ** 2).sum() + 1e-3 * (w ** 2).sum())

    return minimize(loss, np.ones(len(parts)), method="L-BFGS-B", bounds=[(0.0, MAX_WEIGHT)] * len(parts)).x
