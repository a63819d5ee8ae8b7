"""Long documents: `--long-text chunk[:LEN[:STRIDE]]` classifies every window of a text and aggregates.

A text's own tokens (no template, no special tokens) are cut into windows of `LEN - T` tokens that
overlap by `STRIDE` tokens, `T` being what the template and the tokenizer's special tokens add. Each
window is decoded back to text and read as any input is: put into the template (the instruction and
chat format), tokenized, with the special tokens; so the model reads `LEN` tokens per window (a
token or two of the window's end may be cut where the BPE merges differently in the template: the
overlap covers them). Every engine's `_probabilities` classifies windows unchanged, the ONNX
backend's included: one implementation for all.

The window scores are aggregated per text by `--aggregate`: mean | max | logsumexp over the windows
of the log-softmax of their logits (log-probabilities: each window's logits shifted by its own
log-normaliser, which is what every engine, the ONNX graph's probability output included, gives).
For `mean` this equals averaging the raw logits (the shifts cancel in the softmax); `logsumexp`
amounts to averaging the windows' probabilities; `max` lets the most confident window decide.

Memory: windows are made lazily and classified `GROUP_BATCHES x batch_size` at a time, so a 1 MB text
holds its token ids and the scores of its windows (a few floats each), never more than one group of
windows' inputs, and the activations of one batch.

Training (`fit`): every window is a training example labelled with its text's label; validation
probabilities (for the blend, calibration and threshold) are aggregated per text as at prediction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llmclf.data.classification import LabelledTexts
from llmclf.errors import ConfigError

TRUNCATE, CHUNK = "truncate", "chunk"
AGGREGATES = ("mean", "max", "logsumexp")
DEFAULT_LENGTH = 512  # tokens per window when chunk gives none and --max-length is not set (capped at the context)
GROUP_BATCHES = 4  # windows classified per `_probabilities` call: this many batches


@dataclass(frozen=True)
class Chunking:
    """`chunk[:LEN[:STRIDE]]` as given: LEN tokens per window (None: the model's max length), STRIDE of
    overlap (None: a quarter of a window's text part)."""

    length: int | None = None
    stride: int | None = None


def parse(spec: str) -> Chunking | None:
    """`truncate` -> None, `chunk[:LEN[:STRIDE]]` -> Chunking; ConfigError naming the problem."""
    if spec == TRUNCATE:
        return None
    head, *numbers = str(spec).split(":")
    if head != CHUNK or len(numbers) > 2:
        raise ConfigError(f"must be truncate or chunk[:LEN[:STRIDE]] (e.g. chunk:256:64), got {spec!r}")
    try:
        values = [int(n) for n in numbers]
    except ValueError:
        raise ConfigError(f"chunk:LEN:STRIDE takes whole numbers of tokens, got {spec!r}") from None
    length, stride = (values + [None, None])[:2]
    if length is not None and length < 2:
        raise ConfigError(f"a window needs at least 2 tokens, got LEN {length} in {spec!r}")
    if stride is not None and stride < 0:
        raise ConfigError(f"STRIDE (the overlap of windows) must be >= 0, got {stride} in {spec!r}")
    if stride is not None and length is not None and stride >= length:
        raise ConfigError(f"STRIDE {stride} >= LEN {length} in {spec!r}: the overlap must be smaller than the "
                          "window, or the windows never advance; e.g. chunk:256:64")
    return Chunking(length, stride)


def spans(n_tokens: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) of the windows over `n_tokens` tokens: `size` tokens each (the last may be shorter),
    each starting `overlap` tokens before the previous one ends; together they cover every token (an
    empty text: one empty window)."""
    if not 0 <= overlap < size:
        raise ValueError(f"need 0 <= overlap < size, got overlap {overlap}, size {size}")
    out, start = [], 0
    while True:
        end = min(start + size, n_tokens)
        out.append((start, end))
        if end >= n_tokens:
            return out
        start = end - overlap


def aggregate(logits: torch.Tensor, how: str) -> torch.Tensor:
    """(windows, classes) -> (classes): mean | max | logsumexp over the windows."""
    if how == "mean":
        return logits.mean(dim=0)
    if how == "max":
        return logits.max(dim=0).values
    if how == "logsumexp":
        return torch.logsumexp(logits, dim=0)
    raise ConfigError(f"--aggregate must be one of {', '.join(AGGREGATES)}, got {how!r}")


def to_documents(window_probs: np.ndarray, doc_of: Sequence[int], n_docs: int, how: str) -> np.ndarray:
    """Per-text probabilities from their windows' (rows of `window_probs`, window i of text `doc_of[i]`):
    the softmax of the `how` aggregate of the windows' log-probabilities."""
    log_probs = torch.log(torch.from_numpy(np.asarray(window_probs, dtype=np.float32)).clamp_min(1e-30))
    owner = torch.as_tensor(list(doc_of), dtype=torch.long)
    out = np.empty((n_docs, log_probs.shape[1]), dtype=np.float32)
    for d in range(n_docs):
        rows = log_probs[owner == d]
        if len(rows) == 0:
            raise ValueError(f"text {d} has no window")
        out[d] = torch.softmax(aggregate(rows, how), dim=-1).numpy()
    return out


@dataclass(frozen=True)
class Windowing:
    """Chunking resolved for one model: `length` tokens read per window, `text_tokens` of them the text's,
    consecutive windows sharing `stride` text tokens; `how` aggregates."""

    length: int
    text_tokens: int
    stride: int
    how: str
    spec: str


def _is_transformers(tokenizer: Any) -> bool:
    from llmclf.tokenizer import GPT2Tokenizer, HFTokenizer

    return not isinstance(tokenizer, GPT2Tokenizer | HFTokenizer)


def _text_ids(tokenizer: Any, text: str) -> list[int]:
    """The text's own token ids: no special tokens."""
    if _is_transformers(tokenizer):
        return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    ids = tokenizer.encode(text)
    prefix = len(tokenizer.encode(""))  # a BOS the tokenizer adds to every text
    return ids[prefix:]


def _decode(tokenizer: Any, ids: list[int]) -> str:
    if _is_transformers(tokenizer):
        return tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    return tokenizer.decode(ids)


def template_tokens(clf: Any) -> int:
    """Tokens the model reads besides a text's own: the template and the special tokens. Probed with an
    empty text and one-word texts, since the template's tokens next to the text can split differently (GPT-2's
    "\n\n" is one token at the end, two before "a")."""
    probes = ["", "a", " a"]
    inputs = clf._model_inputs(probes)
    if _is_transformers(clf.tokenizer_):
        lengths = [len(ids) for ids in clf.tokenizer_(inputs, verbose=False)["input_ids"]]
    else:
        lengths = [len(clf.tokenizer_.encode(text)) for text in inputs]
    own = [len(_text_ids(clf.tokenizer_, probe)) for probe in probes]
    return max(n - k for n, k in zip(lengths, own, strict=True))


def resolve(clf: Any, spec: str, how: str, length: int, context: int) -> Windowing | None:
    """`spec` for model `clf` (tokenizer and template set) reading `length` tokens per window, of a
    `context` that none may exceed; None for truncate. ConfigError where a window does not fit."""
    chunking = parse(spec)
    if chunking is None:
        return None
    if how not in AGGREGATES:
        raise ConfigError(f"--aggregate must be one of {', '.join(AGGREGATES)}, got {how!r}")
    if length > context:
        raise ConfigError(f"--long-text {spec}: a window of {length} tokens is longer than the model's context of "
                          f"{context} tokens; use chunk:{context} or less")
    overhead = template_tokens(clf)
    text_tokens = length - overhead
    if text_tokens < 1:
        raise ConfigError(f"--long-text {spec}: the template and special tokens alone take {overhead} tokens, which "
                          f"leaves no room for text in a window of {length}; use a window of more than {overhead} "
                          f"tokens (e.g. chunk:{overhead + 128}) or a shorter --template")
    stride = chunking.stride if chunking.stride is not None else text_tokens // 4
    if stride >= text_tokens:
        raise ConfigError(f"--long-text {spec}: STRIDE {stride} >= the {text_tokens} text tokens of a window "
                          f"({length} minus {overhead} of template and special tokens): the overlap must be smaller, "
                          "or the windows never advance")
    return Windowing(length, text_tokens, stride, how, spec)


def fit_length(spec: str, max_length: int | None, context: int) -> int | None:
    """The window length a training run uses (`max_length_`): chunk's LEN, else --max-length, else
    DEFAULT_LENGTH capped at the context; None for truncate. LEN and a different --max-length clash."""
    chunking = parse(spec)
    if chunking is None:
        return None
    if chunking.length is not None and max_length is not None and chunking.length != max_length:
        raise ConfigError(f"--long-text {spec} reads windows of {chunking.length} tokens, --max-length "
                          f"{max_length} says otherwise; give one of them")
    return chunking.length or max_length or min(DEFAULT_LENGTH, context)


def windowing(clf: Any) -> Windowing | None:
    """The fitted or loaded model's windowing (`long_text_`, `aggregate_`), or None (truncate)."""
    spec = getattr(clf, "long_text_", TRUNCATE)
    if spec == TRUNCATE:
        return None
    return resolve(clf, spec, clf.aggregate_, clf.max_length_, clf.max_length_)


def window_texts(clf: Any, text: str, w: Windowing) -> Iterator[str]:
    """The windows of `text` as texts, lazily (each read as an input of its own)."""
    ids = _text_ids(clf.tokenizer_, text)
    for start, end in spans(len(ids), w.text_tokens, w.stride):
        yield _decode(clf.tokenizer_, ids[start:end])


def expand(clf: Any, data: LabelledTexts, w: Windowing) -> tuple[LabelledTexts, list[int]]:
    """`data` as windows, each labelled with its text's label, and the text of each window."""
    texts, labels, doc_of = [], [], []
    for d, text in enumerate(data.texts):
        for window in window_texts(clf, text, w):
            texts.append(window)
            doc_of.append(d)
            if data.labels:
                labels.append(data.labels[d])
    return LabelledTexts(texts, labels, f"{data.source} (windows of {w.length} tokens)"), doc_of


def probabilities(clf: Any, texts: list[str], batch_size: int, dropout: bool) -> np.ndarray:
    """`clf._probabilities` of whole texts: as they are (truncate), or of their windows aggregated per text,
    classified a group of windows at a time."""
    w = windowing(clf)
    if w is None:
        return clf._probabilities(texts, batch_size, dropout)
    group_size = max(1, batch_size) * GROUP_BATCHES
    rows: list[np.ndarray] = []
    doc_of: list[int] = []
    group: list[str] = []
    for d, text in enumerate(texts):
        for window in window_texts(clf, text, w):
            group.append(window)
            doc_of.append(d)
            if len(group) == group_size:
                rows.append(clf._probabilities(group, batch_size, dropout))
                group = []
    if group:
        rows.append(clf._probabilities(group, batch_size, dropout))
    return to_documents(np.concatenate(rows), doc_of, len(texts), w.how)


def refit_by_document(refit: Callable[[int, list[int], list[int]], np.ndarray], doc_of: list[int],
                      how: str) -> Callable[[int, list[int], list[int]], np.ndarray]:
    """An engine's `refit_head(fold, fit, held)` over windows as one over texts (the blend's folds are of texts)."""
    windows_of: dict[int, list[int]] = {}
    for i, d in enumerate(doc_of):
        windows_of.setdefault(d, []).append(i)

    def refit_texts(fold: int, fit: list[int], held: list[int]) -> np.ndarray:
        fit_w = [i for d in fit for i in windows_of[d]]
        held_w = [i for d in held for i in windows_of[d]]
        owner = [k for k, d in enumerate(held) for _ in windows_of[d]]
        return to_documents(refit(fold, fit_w, held_w), owner, len(held), how)

    return refit_texts


def restore(clf: Any, config: dict[str, Any], where: str) -> None:
    """`long_text_` and `aggregate_` of a loaded model from its config.json's "training" (truncate when absent)."""
    training = config.get("training") or {}
    clf.long_text_ = training.get("long_text") or TRUNCATE
    clf.aggregate_ = training.get("aggregate") or "mean"
    try:
        parse(clf.long_text_)
        if clf.aggregate_ not in AGGREGATES:
            raise ConfigError(f"must be one of {', '.join(AGGREGATES)}, got {clf.aggregate_!r}")
    except ConfigError as exc:
        raise ConfigError(f"{where}/config.json: training long_text/aggregate {exc}") from None
