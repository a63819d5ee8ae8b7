"""The sentence-encoder member of a blend (`--ensemble tfidf+ENCODER`): a frozen sentence encoder's
embedding of each text and a logistic regression on it.

The embedding is what sentence-transformers computes for its encoders (all-MiniLM-L6-v2,
all-mpnet-base-v2): the mean of the last layer's token states over the text's tokens, L2-normalised.
Those encoders were trained to place sentences of the same meaning together across a billion pairs of
every kind of text, so a linear model on them reads meaning more than a training set's wording, and it
holds better out of domain than n-grams or a head on a decoder trained on one source (README,
"Results"). The encoder is never trained; the regression's C is chosen once on the training texts by
cross-validated log-loss and kept for every refit. Saved as `encoder.safetensors` (coef, intercept;
the encoder's name in its metadata) beside the model; nothing in it runs code when loaded.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import log_softmax

from llmclf.errors import ConfigError
from llmclf.loaders.tensors import atomic_path

ENCODER_FILE = "encoder.safetensors"
BATCH_SIZE = 32
CS = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0)  # the regression's inverse L2 strengths tried (`choose_c`)


def _regression(c: float = 1.0):
    # Newton-CG, not lbfgs: on unit-length embeddings a large C makes lbfgs crawl (12 s for the search on 1,000
    # AG News texts, stopped short of the optimum at C >= 30) where Newton-CG converges in 1 s.
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, solver="newton-cg", max_iter=2000)


@functools.lru_cache(maxsize=2)
def _encoder(name: str):
    """The tokenizer, encoder and tokens per text of `name` (a packaged encoder, a directory or a Hub id),
    loaded once; the tokens are what the encoder was trained on (sentence-transformers' `max_seq_length`:
    256 for all-MiniLM-L6-v2, 384 for all-mpnet-base-v2), else what it can read."""
    from transformers import AutoModel, AutoTokenizer

    from llmclf.loaders.encoders import from_pretrained, length_limits, quiet_loading, resolve_hf_model

    source = resolve_hf_model(name)
    tokenizer = from_pretrained(AutoTokenizer, source, "tokenizer")
    with quiet_loading():
        model = from_pretrained(AutoModel, source, "encoder")
    return tokenizer, model.float().eval(), length_limits(source, model, tokenizer)[1]


def sentence_embeddings(name: str, texts: list[str], progress: bool = False) -> np.ndarray:
    """(len(texts), dim) float32: each text's mean-pooled, L2-normalised last-layer states (batches of
    texts of similar length, so padding costs little)."""
    import torch
    from tqdm.auto import tqdm

    tokenizer, model, max_tokens = _encoder(name)
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    starts = range(0, len(texts), BATCH_SIZE)
    with torch.inference_mode():
        for start in tqdm(starts, desc=f"embedding ({name})", unit="batch", disable=not progress, leave=False):
            idx = order[start:start + BATCH_SIZE]
            batch = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_tokens,
                              return_tensors="pt")
            states = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
            mean = (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            out[idx] = torch.nn.functional.normalize(mean, dim=-1).numpy()
    return out


def choose_c(embeddings: np.ndarray, labels: np.ndarray, seed: int) -> float:
    """The C of `CS` with the best 5-fold (stratified) log-loss on these texts (fewer folds when a class is small)."""
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    folds = int(min(5, np.bincount(labels).min()))
    if folds < 2:
        return 1.0
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    search = GridSearchCV(_regression(), {"C": list(CS)}, cv=cv, scoring="neg_log_loss")
    return float(search.fit(embeddings, labels).best_params_["C"])


@dataclass
class SentenceEncoderModel:
    """A logistic regression on a frozen sentence encoder's embeddings (see the module docstring)."""

    name: str  # the encoder: a packaged name (all-minilm-l6-v2, all-mpnet-base-v2), a directory or a Hub id
    coef: np.ndarray  # (classes, dim)
    intercept: np.ndarray  # (classes,)
    c: float = 1.0  # the regression's inverse L2 strength (`choose_c`)

    @classmethod
    def fit_embeddings(cls, name: str, embeddings: np.ndarray, labels: np.ndarray | list[int], n_classes: int,
                       c: float) -> SentenceEncoderModel:
        """The regression of these texts' `sentence_embeddings` (label ids in 0..n_classes-1)."""
        labels = np.asarray(labels)
        lr = _regression(c).fit(embeddings, labels)
        if list(lr.classes_) != list(range(n_classes)):
            raise ValueError(f"the sentence-encoder model needs every label id 0..{n_classes - 1} in its training data")
        coef, intercept = lr.coef_, lr.intercept_
        if n_classes == 2:  # scikit-learn's binary form: one row, the score of class 1 over class 0
            coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.array([0.0, intercept[0]])
        as_float32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
        return cls(name, as_float32(coef), as_float32(intercept), c)

    @classmethod
    def fit(cls, name: str, embeddings: np.ndarray, labels: np.ndarray | list[int], n_classes: int,
            seed: int) -> SentenceEncoderModel:
        """`fit_embeddings` with the C that `choose_c` finds on these texts (kept in `.c` for refits)."""
        labels = np.asarray(labels)
        return cls.fit_embeddings(name, embeddings, labels, n_classes, choose_c(embeddings, labels, seed))

    def scores_of(self, embeddings: np.ndarray) -> np.ndarray:
        """Class log-probabilities from `sentence_embeddings`, (texts, classes)."""
        logits = embeddings.astype(np.float64) @ self.coef.T.astype(np.float64) + self.intercept
        return log_softmax(logits, axis=1)

    def scores(self, texts: list[str]) -> np.ndarray:
        """Class log-probabilities of this model alone, (len(texts), classes)."""
        return self.scores_of(sentence_embeddings(self.name, texts))

    def save(self, out_dir: str | os.PathLike) -> Path:
        """`out_dir/encoder.safetensors`, written to a temporary name and renamed."""
        from safetensors.numpy import save_file

        path = Path(out_dir) / ENCODER_FILE
        with atomic_path(path) as tmp:
            save_file({"coef": np.ascontiguousarray(self.coef, dtype=np.float32),
                       "intercept": np.ascontiguousarray(self.intercept, dtype=np.float32)}, str(tmp),
                      metadata={"encoder": self.name, "c": repr(self.c)})
        return path

    @classmethod
    def load(cls, model_dir: str | os.PathLike, name: str, n_classes: int) -> SentenceEncoderModel:
        """The regression saved in `model_dir`, checked against the classifier's classes and encoder name."""
        from safetensors import safe_open

        path = Path(model_dir) / ENCODER_FILE
        if not path.is_file():
            raise ConfigError(f"{path} is missing: the model's config.json says it was trained with --ensemble "
                              f"...+{name}; copy the whole model directory")
        with safe_open(str(path), framework="numpy") as f:
            metadata, arrays = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        if metadata.get("encoder") != name:
            raise ConfigError(f"{path} was fitted on the encoder {metadata.get('encoder')!r}, but config.json "
                              f"names {name!r}")
        coef, intercept = arrays.get("coef"), arrays.get("intercept")
        if coef is None or intercept is None or coef.ndim != 2 or coef.shape[0] != n_classes \
                or intercept.shape != (n_classes,):
            found = [None if a is None else a.shape for a in (coef, intercept)]
            raise ConfigError(f"{path}: expected coef (classes={n_classes}, dim) and intercept ({n_classes},), "
                              f"found {found[0]} and {found[1]}")
        return cls(name, coef, intercept, float(metadata.get("c", "1.0")))
