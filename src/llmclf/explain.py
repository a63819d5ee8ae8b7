"""Why a classifier gave its label: per-token attributions over the user's own text.

`explain(clf, texts)` gives one `Explanation` per text: the label the whole classifier predicts
(n-gram blend, temperature and decision threshold included), and for each piece of the text (a token
of the model's tokenizer, mapped back to a character span of the original text) how much it moved the
*language model's* score of that label. What is explained is stated in `Explanation.explains`:

* `integrated-gradients` (PyTorch engines): the language model's logit of the label, before the
  n-gram blend and the temperature. Integrated gradients (Sundararajan et al., 2017) on the token
  embeddings of the text, from a baseline where every text token's embedding is the average token
  embedding (the mean row of the embedding matrix), along `steps` Gauss-Legendre points (Captum's
  default rule), in batches. Not the pad token's embedding: pad ids differ between families (GPT-2
  and Llama pad with their end-of-text token, which means something to the model). Not zero either:
  families without position embeddings (Llama, Qwen, Gemma) start with an RMSNorm, which reads
  alpha * x the same for every alpha > 0, so from a zero baseline the whole change of the logit
  happens for alpha below ~1e-3, where no quadrature point looks (measured on the Gemma 3 spam model:
  the attributions summed to 8.0 against a logit change of 4.7, at 32 and at 128 steps alike).
  Completeness: the attributions sum to logit(text) - logit(baseline) up to `delta`, which shrinks
  as `steps` grows.
* `occlusion` (the ONNX backend, which has no gradients; or asked for): the language model's
  probability of the label, minus that probability with the token removed from the input.

The template's tokens (instruction, chat format) stay as they are in both: only tokens of the text
are attributed. The n-gram model of a blended classifier is not attributed (its hashed word and
character n-grams overlap and are l2-normalized together, so per-span contributions would not add up);
`Explanation.blended` says when the label also depends on it.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from llmclf.data.classification import TEXT_FIELD, collate, encode_texts, template_suffix_tokens
from llmclf.errors import ConfigError

METHODS = ("auto", "integrated-gradients", "occlusion")
DEFAULT_STEPS = 32
MAX_STEPS = 1024


@dataclass
class ModelAccess:
    """What an engine lends `explain`: its forward pass on padded token ids and where its token
    embeddings are made (None: no gradients, occlusion only)."""

    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ids, mask) (B, T) -> (B, classes)
    embedding: nn.Module | None
    device: torch.device
    pad_id: int
    fixed_length: int | None = None  # pad every sequence to this length (`last-position` pooling)
    outputs_probabilities: bool = False  # `forward` gives probabilities (ONNX), not logits


@dataclass
class TokenAttribution:
    """One piece of the text: characters `text[start:end]` and its attribution. A piece is one token,
    or several when tokens share a character (byte-level BPE splits a character over tokens)."""

    start: int
    end: int
    text: str
    attribution: float


@dataclass
class Explanation:
    """The attributions of one text for the label the classifier predicts (see the module's docstring)."""

    label: str
    method: str
    explains: str  # in words, what `score` is and what the attributions add up to
    score: float  # the explained quantity on the text
    baseline_score: float  # ... with every text token at the baseline (the average embedding; or removed)
    tokens: list[TokenAttribution]
    steps: int | None = None  # integrated gradients' integration points
    blended: bool = False  # the label also depends on an n-gram model, which is not attributed
    truncated: bool = False  # the text was cut to the model's max_length: its end is not attributed
    delta: float | None = field(default=None)  # integrated gradients: sum(attributions) - (score - baseline_score)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the fields above, tokens as {start, end, text, attribution}."""
        return asdict(self)


# --- tokens and character spans -------------------------------------------------------------


def _byte_to_char(text: str) -> tuple[np.ndarray, np.ndarray]:
    """For each UTF-8 byte offset 0..len(bytes): the index of the character it lies in (floor) and of
    the first character starting at or after it (ceil)."""
    sizes = np.array([len(c.encode("utf-8", "surrogatepass")) for c in text], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])  # byte offset of each character, and the end
    offsets = np.arange(starts[-1] + 1)
    floor = np.searchsorted(starts, offsets, side="right") - 1
    ceil = np.searchsorted(starts, offsets, side="left")
    return floor, ceil


def model_input_tokens(clf: Any, text: str) -> tuple[list[int], list[tuple[int, int] | None], bool]:
    """The token ids the model reads for `text` (as `clf.token_ids`); per token, its character span in
    `text` (None for the template's tokens and special tokens; a token that straddles the text's edge
    is clipped to it); and whether tokens of the text were cut off (the text is longer than max_length)."""
    from llmclf.tokenizer import GPT2Tokenizer, HFTokenizer

    template = getattr(clf, "template_", None)
    model_input = text if template is None else template.replace(TEXT_FIELD, text)
    begin = 0 if template is None else template.index(TEXT_FIELD)  # the text's first occurrence
    tokenizer = clf.tokenizer_
    if isinstance(tokenizer, GPT2Tokenizer):
        ids = tokenizer.encode(model_input)
        lengths = [len(tokenizer.encoding.decode_single_token_bytes(i)) for i in ids]
        ends = np.cumsum([0, *lengths])
        floor, ceil = _byte_to_char(model_input)
        spans: list[tuple[int, int] | None] = [(int(floor[a]), int(ceil[b]))
                                               for a, b in zip(ends[:-1], ends[1:], strict=True)]
    elif isinstance(tokenizer, HFTokenizer):
        from llmclf.tokenizer import _unicode

        encoding = tokenizer.backend.encode(_unicode(model_input), add_special_tokens=False)
        ids = tokenizer.encode(model_input)
        spans = [None] * (len(ids) - len(encoding.ids)) + [tuple(o) for o in encoding.offsets]
    else:  # a Transformers tokenizer (the Transformers engine, or an ONNX export of it)
        enc = tokenizer(model_input, truncation=True, max_length=clf.max_length_, return_offsets_mapping=True,
                        return_special_tokens_mask=True)
        ids = list(enc["input_ids"])
        spans = [None if special else tuple(o) for o, special in zip(enc["offset_mapping"],
                                                                      enc["special_tokens_mask"], strict=True)]
    end = begin + len(text)
    spans = [None if s is None or s[1] <= begin or s[0] >= end or s[0] >= s[1]
             else (max(s[0], begin) - begin, min(s[1], end) - begin) for s in spans]
    n_text = sum(s is not None for s in spans)
    if isinstance(tokenizer, GPT2Tokenizer | HFTokenizer) and ids:  # cut as the model's input is (encode_texts)
        keep = encode_texts([""], tokenizer, clf.max_length_, token_ids=[list(range(len(ids)))],
                            keep_last=template_suffix_tokens(template, tokenizer)).ids[0]
        ids, spans = [ids[i] for i in keep], [spans[i] for i in keep]
    if not ids:  # an empty text without a template: the model reads one pad token (encode_texts)
        ids, spans = [tokenizer.pad_id], [None]
    return ids, spans, sum(s is not None for s in spans) < n_text


def _pieces(spans: Sequence[tuple[int, int] | None]) -> list[tuple[int, int, list[int]]]:
    """The text tokens' positions grouped into non-overlapping pieces (start, end, positions), in order:
    tokens whose spans overlap (parts of one character) form one piece."""
    pieces: list[tuple[int, int, list[int]]] = []
    for pos, span in enumerate(spans):
        if span is None:
            continue
        start, end = span
        if pieces and start < pieces[-1][1]:
            s, e, positions = pieces[-1]
            pieces[-1] = (s, max(e, end), [*positions, pos])
        else:
            pieces.append((start, end, [pos]))
    return pieces


# --- the two methods -------------------------------------------------------------------------


def gauss_legendre(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Points in (0, 1) and their weights for integrating over [0, 1] (Captum's `gausslegendre`)."""
    x, w = np.polynomial.legendre.leggauss(steps)
    return 0.5 * (x + 1), 0.5 * w


@contextlib.contextmanager
def _scaled_embeddings(embedding: nn.Module, scale: torch.Tensor, captured: list[torch.Tensor]) -> Iterator[None]:
    """While inside: `embedding`'s output x (B, T, C) becomes base + scale * (x - base), `scale` (B, T)
    and base the average token embedding (`baseline_embedding`), and is made a leaf that requires grad
    (appended to `captured`), so gradients w.r.t. these embeddings can be read."""
    base = baseline_embedding(embedding)

    def hook(_module: nn.Module, _inputs: Any, out: torch.Tensor) -> torch.Tensor:
        b = base.to(out.dtype)
        x = (b + (out.detach() - b) * scale[..., None].to(out.dtype)).requires_grad_(True)
        captured.append(x)
        return x

    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def baseline_embedding(embedding: nn.Module) -> torch.Tensor:
    """The integrated-gradients baseline of one text token: the mean row of the embedding matrix (C,)."""
    return embedding.weight.detach().float().mean(0)


def _rows(access: ModelAccess, ids: list[int], rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids, mask = collate([ids] * rows, access.pad_id, access.fixed_length)
    return input_ids.to(access.device), mask.to(access.device)


def integrated_gradients(access: ModelAccess, ids: list[int], text_mask: Sequence[bool], target: int,
                         steps: int = DEFAULT_STEPS, batch_size: int = 32) -> tuple[np.ndarray, float, float]:
    """Integrated gradients of logit `target` w.r.t. the embeddings of the positions where `text_mask` is
    true (the others keep their embeddings), from the average token embedding there. Returns (attribution per
    position, summed over the embedding dimension; logit of the input; logit of the baseline)."""
    if access.embedding is None:
        raise ConfigError("integrated gradients need the PyTorch model; this backend has no gradients: "
                          "use --explain-method occlusion")
    alphas, weights = gauss_legendre(steps)
    length = len(ids)
    in_text = torch.zeros(access.fixed_length or length, device=access.device)
    in_text[:length] = torch.as_tensor(text_mask, dtype=torch.float32, device=access.device)
    total: torch.Tensor | float = 0.0  # the weighted sum of the gradients (T, C)
    for first in range(0, steps, batch_size):
        chunk = torch.as_tensor(alphas[first:first + batch_size], dtype=torch.float32, device=access.device)
        scale = 1 - in_text + in_text * chunk[:, None]
        captured: list[torch.Tensor] = []
        with torch.enable_grad(), _scaled_embeddings(access.embedding, scale, captured):
            logits = access.forward(*_rows(access, ids, len(chunk))).float()
            (grad,) = torch.autograd.grad(logits[:, target].sum(), captured[0])
        w = torch.as_tensor(weights[first:first + batch_size], dtype=torch.float32, device=access.device)
        total = total + (grad.float() * w[:, None, None]).sum(0)
    with torch.no_grad(), _scaled_embeddings(access.embedding, torch.stack([torch.ones_like(in_text), 1 - in_text]),
                                             []):  # the input, and the baseline: text embeddings average
        input_ids, mask = _rows(access, ids, 2)
        score, baseline = access.forward(input_ids, mask).float()[:, target].tolist()
    with torch.no_grad():
        difference = access.embedding(input_ids[:1])[0].float() - baseline_embedding(access.embedding)
    attributions = (difference * total).sum(-1) * in_text  # (x - baseline) * average gradient
    return attributions[:length].cpu().numpy(), score, baseline


def occlusion(access: ModelAccess, ids: list[int], text_mask: Sequence[bool], target: int,
              batch_size: int = 32) -> tuple[np.ndarray, float, float]:
    """Occlusion: for each text position, the model's probability of `target` minus that probability
    with the token removed. Returns (attribution per position; probability of the input; probability
    with every text token removed)."""
    positions = [i for i, t in enumerate(text_mask) if t]
    variants = [ids, [t for t, keep in zip(ids, text_mask, strict=True) if not keep] or [access.pad_id]]
    variants += [ids[:p] + ids[p + 1:] or [access.pad_id] for p in positions]
    probs = []
    with torch.no_grad():
        for first in range(0, len(variants), batch_size):
            input_ids, mask = collate(variants[first:first + batch_size], access.pad_id, access.fixed_length)
            out = access.forward(input_ids.to(access.device), mask.to(access.device)).float()
            probs.append((out if access.outputs_probabilities else torch.softmax(out, -1))[:, target].cpu())
    p = torch.cat(probs).numpy().astype(np.float64)
    attributions = np.zeros(len(ids))
    attributions[positions] = p[0] - p[2:]
    return attributions, float(p[0]), float(p[1])


# --- the public API --------------------------------------------------------------------------


def resolve_method(clf: Any, method: str) -> str:
    """`auto`: integrated gradients where the engine has gradients, else occlusion."""
    if method not in METHODS:
        raise ConfigError(f"unknown explanation method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "auto":
        return "integrated-gradients" if clf._explain_access().embedding is not None else "occlusion"
    return method


def explain(clf: Any, texts: Sequence[str] | str, *, method: str = "auto", steps: int = DEFAULT_STEPS,
            batch_size: int = 32, probabilities: np.ndarray | None = None) -> list[Explanation]:
    """Per-token attributions of each text for the label `clf` predicts for it (see the module's
    docstring for what they explain). `steps`: integrated gradients' integration points (more: a
    smaller `delta`, proportionally slower); `batch_size`: rows per forward pass;
    `probabilities`: `clf.predict_proba(texts)` when already computed."""
    from llmclf.training.calibration import decide

    clf._check_fitted()
    texts = clf._as_texts(texts)
    if not 1 <= steps <= MAX_STEPS:
        raise ConfigError(f"explanation steps must be in 1..{MAX_STEPS}, got {steps}")
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    method = resolve_method(clf, method)
    if probabilities is None:
        probabilities = clf.predict_proba(texts, batch_size=batch_size)
    labels = decide(np.asarray(probabilities), clf.decision)
    access = clf._explain_access()
    blended = getattr(clf, "ngrams_", None) is not None
    results = []
    for text, target in zip(texts, labels, strict=True):
        target = int(target)
        ids, spans, truncated = model_input_tokens(clf, text)
        text_mask = [s is not None for s in spans]
        if method == "integrated-gradients":
            per_position, score, baseline = integrated_gradients(access, ids, text_mask, target, steps, batch_size)
            explains = (f"the language model's logit of {clf.classes_[target]!r} (before any n-gram blend and "
                        "temperature); the attributions add up to score - baseline_score (text embeddings average) "
                        "up to delta")
        else:
            per_position, score, baseline = occlusion(access, ids, text_mask, target, batch_size)
            explains = (f"the language model's probability of {clf.classes_[target]!r} (before any n-gram blend "
                        "and temperature); each attribution: that probability minus the same without the token")
        tokens = [TokenAttribution(start, end, text[start:end], float(sum(per_position[p] for p in positions)))
                  for start, end, positions in _pieces(spans)]
        results.append(Explanation(
            label=clf.classes_[target], method=method, explains=explains, score=score, baseline_score=baseline,
            tokens=tokens, steps=steps if method == "integrated-gradients" else None, blended=blended,
            truncated=truncated,
            delta=(sum(t.attribution for t in tokens) - (score - baseline)
                   if method == "integrated-gradients" else None)))
    return results


def plot_explanation(text: str, explanation: Explanation, path: str | os.PathLike, probability: float | None = None,
                     width: int = 64) -> Path:
    """A PNG of `text` with each attributed piece highlighted (green: for the label, red: against;
    stronger colour, larger attribution), lines wrapped at `width` characters, and what it explains."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from llmclf.loaders.tensors import atomic_path

    segments: list[tuple[str, float | None]] = []  # the text as (characters, attribution or None for gaps)
    at = 0
    for t in explanation.tokens:
        if t.start > at:
            segments.append((text[at:t.start], None))
        segments.append((text[t.start:t.end], t.attribution))
        at = max(at, t.end)
    if at < len(text):
        segments.append((text[at:], None))
    lines: list[list[tuple[str, float | None]]] = [[]]
    column = 0
    for chars, value in segments:
        for i, part in enumerate(chars.split("\n")):  # the text's own line breaks start new lines
            if i > 0:
                lines.append([])
                column = 0
            words = [w[j:j + width] for w in re.findall(r"\S+\s*|\s+", part) for j in range(0, len(w), width)]
            for word in words:  # a piece of several words may wrap between them
                if column + len(word.rstrip()) > width and column > 0:
                    lines.append([])
                    column = 0
                lines[-1].append((word, value))
                column += len(word)
    largest = max([abs(t.attribution) for t in explanation.tokens] + [1e-12])
    char_inches, line_inches = 0.118, 0.34
    fig_width = width * char_inches + 0.6
    title = f"{explanation.label}" + (f" ({probability:.1%})" if probability is not None else "")
    total = sum(t.attribution for t in explanation.tokens)
    gap = explanation.score - explanation.baseline_score
    caption = textwrap.fill(f"{explanation.method}: {explanation.explains}. Green: for {explanation.label!r}, red: "
                            f"against. Sum {total:+.3f}"
                            + (f"; score - baseline_score {gap:+.3f} (delta {explanation.delta:+.3f}, "
                               f"{explanation.steps} steps)." if explanation.delta is not None else ".")
                            + (" The n-gram model's part of the label is not shown." if explanation.blended else ""),
                            int(width * 1.25))
    n_caption = caption.count("\n") + 1
    fig = plt.figure(figsize=(fig_width, line_inches * (len(lines) + 1.2) + 0.2 * n_caption + 0.3))
    ax = fig.add_axes((0.3 / fig_width, 0, 1 - 0.6 / fig_width, 1))
    ax.set_xlim(0, width)
    height = len(lines) + 1.2 + (0.2 * n_caption + 0.3) / line_inches
    ax.set_ylim(height, 0)
    ax.axis("off")
    font = char_inches * 72 / 0.602  # DejaVu Sans Mono advances 0.602 em per character
    ax.text(0, 0.7, title, fontsize=font * 1.2, weight="bold", va="center", parse_math=False)
    for row, line in enumerate(lines, start=1):
        column = 0
        for chars, value in line:
            if value is not None:
                strength = min(1.0, abs(value) / largest)
                colour = (0.12, 0.63, 0.27, 0.08 + 0.6 * strength) if value >= 0 else (0.86, 0.2, 0.2,
                                                                                        0.08 + 0.6 * strength)
                ax.add_patch(Rectangle((column, row + 0.08), len(chars), 0.84, color=colour, linewidth=0))
            ax.text(column, row + 0.5, chars, family="DejaVu Sans Mono", fontsize=font, va="center",
                    parse_math=False)
            column += len(chars)
    ax.text(0, len(lines) + 1.3, caption, fontsize=font * 0.75, va="top", color="0.35", parse_math=False)
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)
