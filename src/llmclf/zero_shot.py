"""Zero- and few-shot classification with an instruction-tuned causal LM: no training.

Each text is put into a prompt in the backbone's chat format ("Classify the text as one of: ...");
each label's verbalisation is scored by the log-probability of its tokens as the assistant's answer
(summed or averaged over its tokens), and a softmax over the labels gives the probabilities.

Few-shot examples are earlier turns of the same conversation: each is written as the text is (the
template's part before `{text}`) and answered by the assistant with its label, so the model sees the
answer in the very place it is asked for one. `calibrate="content-free"` divides each label's
probability by its probability for texts with no content ("N/A", "", "[MASK]"), as contextual
calibration does (Zhao et al., 2021, "Calibrate Before Use"): it removes the prompt's own bias toward
some labels, which examples in the prompt (their order, the last one's label) add to.

The prompt's shared head (instruction and, with `shots`, the labelled examples) is run once; its
keys/values (`SharedPrefixCache`) serve every text, expanded over the batch without copying the
prefix per row. Each batch of texts is run once after it; the label continuations of every text
are then run in one batched pass after that text's keys/values.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llmclf.data.classification import LabelledTexts
from llmclf.engines.base import BaseClassifier
from llmclf.errors import ConfigError, DataError
from llmclf.models.decoder import KVCache, rows_at

log = logging.getLogger(__name__)

ENGINE = "zero-shot"
SCORES = ("mean", "sum")
SHOT_SELECTIONS = ("random", "nearest")
DEFAULT_SCORE = "mean"
# The user's message (inside the backbone's chat format); {examples} holds the few-shot examples.
DEFAULT_ZERO_SHOT_TEMPLATE = ("Classify the text as one of: {labels}. Answer with the label only.\n\n"
                              "{examples}Text: {text}")
PLAIN_TURN = "{prompt}\n"  # models without a chat format: the answer on the next line
CALIBRATIONS = ("none", "content-free")
CONTENT_FREE_TEXTS = ("N/A", "", "[MASK]")  # Zhao et al. (2021)
TEXT_RESERVE = 512  # tokens of the context kept for the text itself when examples are cut to fit
MIN_EXAMPLE_TOKENS = 8  # examples cut shorter than this are refused rather than sent
ROW_TOKEN_BUDGET = 1 << 18  # rows x context tokens per forward pass (bounds the keys/values gathered per layer)
EMBEDDING_TOKENS = 128  # tokens of a text read for its `nearest` embedding


class SharedPrefixCache:
    """Keys and values of earlier segments, shared across rows, plus this pass's (duck-types `KVCache`).

    A segment's per-layer keys (b, H, S, D) have b == 1 (the prompt head: expanded, not copied) or
    b dividing `rows` (a batch of texts, each repeated for its label continuations). One forward
    pass may add keys/values; `extended(repeat)` makes the cache for the next pass, whose rows
    continue each of these rows `repeat` times.
    """

    def __init__(self, segments: list[tuple[list[torch.Tensor], list[torch.Tensor]]], length: int,
                 rows: int) -> None:
        self.segments, self.length, self.rows = segments, length, rows
        n_layers = len(segments[0][0])
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers

    @classmethod
    def from_kv_cache(cls, cache: KVCache, rows: int) -> SharedPrefixCache:
        """The keys/values a (batch-1) `KVCache` holds, shared by `rows` rows."""
        keys = [k[:, :, : cache.length] for k in cache.keys]
        values = [v[:, :, : cache.length] for v in cache.values]
        return cls([(keys, values)], cache.length, rows)

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        if t.shape[0] == self.rows:
            return t
        if t.shape[0] == 1:
            return t.expand(self.rows, *t.shape[1:])
        return t.repeat_interleave(self.rows // t.shape[0], dim=0)

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep this pass's (rows, H, T, D) keys/values; return the segments' and these, (rows, H, S + T, D)."""
        if self.keys[layer] is not None:
            raise ValueError("a SharedPrefixCache takes one forward pass; use extended() for the next")
        self.keys[layer], self.values[layer] = keys, values
        ks = [self._rows(seg[0][layer].to(keys.dtype)) for seg in self.segments] + [keys]
        vs = [self._rows(seg[1][layer].to(values.dtype)) for seg in self.segments] + [values]
        return torch.cat(ks, dim=2), torch.cat(vs, dim=2)

    def extended(self, repeat: int) -> SharedPrefixCache:
        """The cache for a pass continuing each row `repeat` times (row i -> rows i*repeat ... )."""
        if any(k is None for k in self.keys):
            raise ValueError("extended() needs this cache's forward pass first")
        return SharedPrefixCache([*self.segments, (self.keys, self.values)], self.length, self.rows * repeat)


def _pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T) and their mask (B, T) of `seqs`."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool, device=device)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = True
    return ids, mask


@torch.no_grad()
def label_log_probs(model: torch.nn.Module, prefix: SharedPrefixCache | KVCache, texts: Sequence[Sequence[int]],
                    labels: Sequence[Sequence[int]], pad_id: int = 0) -> torch.Tensor:
    """Per text and label, the log-probabilities of the label's tokens after prefix + text: (N, C, Lmax), 0
    past a label's end. `prefix` holds the shared head (batch 1); each text must have at least one token.

    One pass runs the texts (right-padded) after the prefix; a second runs every label after every
    text (N x C rows) after their keys/values. The first label token's log-probability comes from
    the text's last position."""
    device = model.out_head.weight.device
    if isinstance(prefix, KVCache):
        prefix = SharedPrefixCache.from_kv_cache(prefix, len(texts))
    past, n, c = prefix.length, len(texts), len(labels)
    text_ids, text_mask = _pad(texts, pad_id, device)
    head = torch.ones((n, past), dtype=torch.bool, device=device)
    hidden = model.hidden_states(text_ids, torch.cat([head, text_mask], dim=1), kv_cache=prefix)
    last = text_mask.sum(dim=1) - 1
    first = F.log_softmax(model.out_head(rows_at(hidden, last)[:, 0]).float(), dim=-1)  # (N, V)
    label_ids, label_mask = _pad(labels, pad_id, device)  # (C, L)
    out = torch.zeros((n, c, label_ids.shape[1]), dtype=torch.float32, device=device)
    out[:, :, 0] = first[:, label_ids[:, 0]]
    if label_ids.shape[1] > 1:  # the later tokens of the labels, every label after every text
        cache = prefix.extended(c)
        rows_ids = label_ids[:, :-1].repeat(n, 1)  # (N*C, L-1): row i*C + j = label j after text i
        mask = torch.cat([head.repeat_interleave(c, 0), text_mask.repeat_interleave(c, 0),
                          label_mask[:, :-1].repeat(n, 1)], dim=1)
        logits = model.out_head(model.hidden_states(rows_ids, mask, kv_cache=cache)).float()
        logp = F.log_softmax(logits, dim=-1)  # (N*C, L-1, V)
        later = logp.gather(-1, label_ids[:, 1:].repeat(n, 1)[..., None])[..., 0]
        out[:, :, 1:] = later.view(n, c, -1)
    return out * label_mask[None].float()


def combine_scores(token_log_probs: torch.Tensor, lengths: Sequence[int], score: str) -> torch.Tensor:
    """(N, C) label scores from (N, C, Lmax) token log-probabilities: `sum`, or `mean` over each label's tokens."""
    total = token_log_probs.sum(dim=-1)
    if score == "sum":
        return total
    return total / torch.tensor(list(lengths), dtype=total.dtype, device=total.device)


def conversation_parts(chat_template: str | None) -> tuple[str, str, str, str]:
    """(before the first message, after a message up to the answer, end of an answer, a next user
    turn's start) of a one-turn chat format such as "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n".

    A turn ends where the text after the message has its first line break ("<|im_end|>\n",
    "<end_of_turn>\n"); the next user turn starts as the first one does, after the last such end in
    the text before the message (which may hold a system turn)."""
    before, after = (chat_template or PLAIN_TURN).split("{prompt}")
    end = after[: after.index("\n") + 1] if "\n" in after else after
    return before, after, end, before.rsplit(end, 1)[-1] if end else before


def label_words(label: str) -> tuple[str, str]:
    """(class name, the words the model reads and scores for it) of a `--labels` entry: `NAME=WORDS`, or NAME."""
    name, sep, words = label.partition("=")
    name, words = name.strip(), words.strip() if sep else name.strip()
    if sep and not (name and words):
        raise ConfigError(f"label {label!r}: NAME=WORDS needs both, e.g. \"ham=not spam\"")
    return name, words


class ZeroShotClassifier(BaseClassifier):
    """A classifier from an instruction-tuned causal LM and label names alone (zero-shot), or with
    `shots` labelled examples per class in the prompt (few-shot); nothing is trained.

    `ZeroShotClassifier("smollm2-135m", labels=["positive", "negative"]).fit().predict(["Loved it"])`

    Args:
        model: a from-scratch causal LM (`smollm2-135m`, `qwen2.5-0.5b`, `gemma3-270m`, a GGUF file or
            Hugging Face directory of a registered family); its chat format frames the prompt.
        labels: the class names, in the order of `classes_` and of the probability columns; each is
            scored as the answer's text, so name them as a person would ("spam", "not spam"). `NAME=WORDS`
            keeps NAME as the class (the data's label) and gives the model WORDS to read and score
            (`"ham=not spam"`: SMS data says "ham", a word the model does not read as "not spam").
        template: the user's message, with `{text}` and optionally `{labels}` (the names joined by
            ", ") and `{examples}` (the few-shot examples); default `DEFAULT_ZERO_SHOT_TEMPLATE`.
        score: `mean` (default) or `sum` of the label tokens' log-probabilities.
        shots: labelled examples per class in the prompt (from `fit`'s data); 0: zero-shot.
        shot_selection: `random` (one draw by `seed`, shared by every text, so its keys/values are
            computed once) or `nearest` (per text, the examples closest by the model's mean hidden
            state: a prompt per text, slower).
        calibrate: `none` (default) or `content-free`: contextual calibration, each label's probability
            divided by its mean probability for content-free texts ("N/A", "", "[MASK]"), then normalised.
        max_length: most tokens of a whole prompt (default: the model's context length).
    """

    engine = ENGINE
    extra_params = ("labels", "template", "score", "shots", "shot_selection", "seed", "calibrate", "max_length",
                    "precision", "device")

    def __init__(self, model: str = "smollm2-135m", labels: Sequence[str] = (), template: str | None = None,
                 score: str = DEFAULT_SCORE, shots: int = 0, shot_selection: str = "random", seed: int = 123,
                 calibrate: str = "none", max_length: int | None = None, precision: str = "auto",
                 device: str | None = None) -> None:
        self.model, self.labels, self.template, self.score = model, labels, template, score
        self.shots, self.shot_selection, self.seed, self.max_length = shots, shot_selection, seed, max_length
        self.calibrate = calibrate
        self.precision, self.device = precision, device

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {name: getattr(self, name) for name in ("model", *self.extra_params)}

    def set_params(self, **params: Any) -> ZeroShotClassifier:
        unknown = sorted(set(params) - {"model", *self.extra_params})
        if unknown:
            raise ConfigError(f"unknown ZeroShotClassifier option(s) {unknown}; known: model, "
                              f"{', '.join(self.extra_params)}")
        for name, value in params.items():
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        return f"ZeroShotClassifier(model={self.model!r}, labels={list(self.labels)!r}, shots={self.shots})"

    # --- building the prompt ---------------------------------------------------------------

    def _check_options(self, examples: LabelledTexts | None) -> list[str]:
        labels = [self.labels] if isinstance(self.labels, str) else list(self.labels)
        if not labels:
            raise ConfigError("the label set is empty: give the class names, e.g. --labels \"positive,negative\"")
        for i, label in enumerate(labels):
            if not isinstance(label, str):
                raise ConfigError(f"label {i} is a {type(label).__name__}, not a string")
        pairs = [label_words(label) for label in labels]
        names, words = tuple(n for n, _ in pairs), tuple(w for _, w in pairs)
        labels = list(names)
        for kind, values in (("label", names), ("label wording", words)):
            if dupes := sorted({x for x in values if values.count(x) > 1 and x}):
                raise ConfigError(f"duplicate {kind}(s) {dupes}: each class needs its own name")
        self.words_ = list(words)
        if len(labels) < 2:
            raise ConfigError(f"one label {labels}: zero-shot classification needs two or more")
        if self.score not in SCORES:
            raise ConfigError(f"score must be {' or '.join(SCORES)}, got {self.score!r}")
        if self.calibrate not in CALIBRATIONS:
            raise ConfigError(f"calibrate must be {' or '.join(CALIBRATIONS)}, got {self.calibrate!r}")
        if self.shot_selection not in SHOT_SELECTIONS:
            raise ConfigError(f"shot selection must be {' or '.join(SHOT_SELECTIONS)}, got {self.shot_selection!r}")
        if not isinstance(self.shots, int) or self.shots < 0:
            raise ConfigError(f"shots must be an integer >= 0, got {self.shots!r}")
        template = self.template or DEFAULT_ZERO_SHOT_TEMPLATE
        if template.count("{text}") != 1:
            raise ConfigError("the zero-shot template must contain {text} once (where the text goes), "
                              f"got {template!r}")
        if self.shots and "{examples}" not in template:
            raise ConfigError(f"--shots {self.shots} needs {{examples}} in the template, before {{text}}: "
                              f"{template!r}")
        if "{examples}" in template and template.index("{examples}") > template.index("{text}"):
            raise ConfigError(f"{{examples}} must come before {{text}} in the template: {template!r}")
        if self.shots and (examples is None or not len(examples)):
            raise ConfigError(f"--shots {self.shots} needs labelled examples to choose from (--train FILE)")
        if self.shots and examples is not None:
            unknown = sorted(set(examples.labels) - set(labels))
            if unknown:
                raise DataError(f"{examples.source}: labels {unknown} are not among the zero-shot labels {labels}; "
                                "--labels must name the labels the examples use")
            for label in labels:
                have = examples.labels.count(label)
                if have < self.shots:
                    raise DataError(f"{examples.source}: label {label!r} has {have} example(s), fewer than --shots "
                                    f"{self.shots}")
        return labels

    def _load(self) -> None:
        from llmclf.engines import choose_engine
        from llmclf.families import FAMILIES
        from llmclf.loaders.spec import chat_template_for, load_model
        from llmclf.runtime import resolve_device, resolve_precision

        spec = str(self.model)
        if choose_engine(spec) != "scratch":
            chat_models = [n for f in FAMILIES.values() if f.chat_template or any(
                p.chat_template for p in f.packaged.values()) for n in f.packaged]
            raise ConfigError(f"{spec} is not a causal language model (it would run on the Transformers engine, "
                              "e.g. an encoder such as MiniLM or mpnet), so it cannot score label names; zero-shot "
                              f"needs an instruction-tuned decoder: {', '.join(chat_models)}, or a GGUF file / "
                              f"Hugging Face directory of the {', '.join(FAMILIES)} families")
        model, self.tokenizer_ = load_model(spec)
        if model.out_head.out_features != self.tokenizer_.vocab_size and model.out_head.out_features < 8:
            raise ConfigError(f"{spec} is a classifier checkpoint (a {model.out_head.out_features}-class head); "
                              "zero-shot needs the language model it was trained from")
        self.device_ = resolve_device(self.device)
        self.dtype_ = resolve_precision(self.precision, self.device_)
        self.model_ = model.to(self.device_).eval()
        self.chat_template_ = chat_template_for(spec)

    def _encode(self, text: str) -> list[int]:
        """Token ids of a piece of the prompt, without the BOS the tokenizer puts before a whole text."""
        ids = self.tokenizer_.encode(text)
        bos = getattr(self.tokenizer_, "bos_id", None)
        return ids[1:] if bos is not None and ids[:1] == [bos] else ids

    def fit(self, examples: LabelledTexts | None = None) -> ZeroShotClassifier:
        """Load the model, check the labels and options, choose the few-shot examples (from `examples`,
        with `shots`) and run the shared prompt head once. Returns self."""
        labels = self._check_options(examples)
        if not hasattr(self, "model_") or getattr(self, "loaded_spec_", None) != str(self.model):
            self._load()
            self.loaded_spec_ = str(self.model)
        self.classes_ = labels
        self.label_ids_ = [self._encode(words) for words in self.words_]
        if empty := [label for label, ids in zip(labels, self.label_ids_, strict=True) if not ids]:
            raise ConfigError(f"label(s) {empty} tokenise to nothing: give every class a name made of text")
        self.max_length_ = min(self.max_length or self.model_.context_length, self.model_.context_length)
        message = (self.template or DEFAULT_ZERO_SHOT_TEMPLATE).replace("{labels}", ", ".join(self.words_))
        first, self.answer_, self.end_of_answer_, self.next_turn_ = conversation_parts(self.chat_template_)
        head, self.tail_ = (first + message + self.answer_).split("{text}")
        self.head_a_, _, self.head_b_ = head.partition("{examples}")
        head_ids = self.tokenizer_.encode(self.head_a_)  # the whole prompt's start: with BOS
        self.tail_ids_ = self._encode(self.tail_)
        self.max_label_ = max(len(ids) for ids in self.label_ids_)
        fixed = len(head_ids) + len(self._encode(self.head_b_)) + len(self.tail_ids_) + self.max_label_
        if fixed + 1 > self.max_length_:
            raise ConfigError(f"the prompt without any text takes {fixed} tokens, more than the context of "
                              f"{self.max_length_}: shorten the template or the labels")
        self.examples_, self.pool_ = [], None
        if self.shots:
            per_example = (self.max_length_ - fixed - min(TEXT_RESERVE, self.max_length_ // 4)) \
                // (self.shots * len(labels))
            overhead = len(self._encode(self._example("", max(self.words_, key=len))))
            self.example_tokens_ = per_example - overhead
            if self.example_tokens_ < MIN_EXAMPLE_TOKENS:
                raise ConfigError(f"{self.shots} examples per class ({self.shots * len(labels)} in all) do not fit "
                                  f"the context of {self.max_length_} tokens with room for the text (each would be cut "
                                  f"to {max(self.example_tokens_, 0)} tokens); use fewer --shots or a shorter template")
            if self.shot_selection == "random":
                self.examples_ = self._random_examples(examples)
            else:
                self.pool_ = examples
                self.pool_embeddings_ = self._embeddings(examples.texts)
        shared = self.head_a_ + (self._examples_text(self.examples_) + self.head_b_
                                 if self.shot_selection == "random" or not self.shots else "")
        shared_ids = self.tokenizer_.encode(shared)
        if len(shared_ids) < 2:
            raise ConfigError(f"the template {self.template!r} has (almost) nothing before {{text}}: the prompt's "
                              "shared start needs at least two tokens (an instruction)")
        # The head's last token is run with each text, so that no text's part is empty.
        self.prefix_ids_, self.first_ids_ = shared_ids[:-1], shared_ids[-1:]
        self.prefix_cache_ = self._prefill(self.prefix_ids_)
        self.temperature_, self.decision_ = 1.0, None
        # cheap (three short texts), so kept whether used or not: `info()` shows the prompt's bias
        self.content_free_ = self.label_token_log_probs(list(CONTENT_FREE_TEXTS))
        self.config_ = {"backbone": str(self.model), "engine": ENGINE, "zero_shot": self._description()}
        return self

    def _description(self) -> dict[str, Any]:
        return {"score": self.score, "shots": self.shots,
                "shot_selection": self.shot_selection if self.shots else None,
                "seed": self.seed if self.shots else None, "prompt_tokens": len(self.prefix_ids_) + 1,
                "calibrate": self.calibrate, "content_free_probabilities": dict(zip(
                    self.classes_, map(float, self._content_free_probabilities(self.score)), strict=True)),
                "template": self.head_a_ + ("{examples}" if self.shots else "") + self.head_b_ + "{text}" + self.tail_}

    def info(self) -> dict[str, Any]:
        """`BaseClassifier.info` plus how the labels are scored (`zero_shot`)."""
        return {**super().info(), "zero_shot": self._description()}

    def _random_examples(self, examples: LabelledTexts) -> list[tuple[str, str]]:
        rng = random.Random(self.seed)
        chosen = []
        for label in self.classes_:
            pool = [t for t, lab in zip(examples.texts, examples.labels, strict=True) if lab == label]
            chosen += [(t, label) for t in rng.sample(pool, self.shots)]
        rng.shuffle(chosen)
        return chosen

    def _example(self, text: str, words: str) -> str:
        """One example as an earlier turn: the text as the template writes it, the label's words as the answer."""
        return self.head_b_ + text + self.answer_ + words + self.end_of_answer_ + self.next_turn_

    def _examples_text(self, examples: list[tuple[str, str]]) -> str:
        parts = []
        for text, label in examples:
            ids = self._encode(text)
            if len(ids) > self.example_tokens_:
                text = self.tokenizer_.decode(ids[: self.example_tokens_]) + " ..."
            parts.append(self._example(text, self.words_[self.classes_.index(label)]))
        return "".join(parts)

    def _embeddings(self, texts: list[str]) -> torch.Tensor:
        """Unit-length mean final hidden states of `texts` (first EMBEDDING_TOKENS tokens), (N, C)."""
        from llmclf.runtime import inference_autocast

        out = []
        for start in range(0, len(texts), 32):
            seqs = [(self._encode(t) or self.first_ids_)[:EMBEDDING_TOKENS] for t in texts[start:start + 32]]
            ids, mask = _pad(seqs, self.tokenizer_.pad_id, self.device_)
            with torch.no_grad(), inference_autocast(self.model_, self.device_, self.dtype_):
                hidden = self.model_.hidden_states(ids, mask).float()
            mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            out.append(F.normalize(mean, dim=-1))
        return torch.cat(out)

    def _nearest_examples(self, text: str, embedding: torch.Tensor) -> list[tuple[str, str]]:
        similarity = self.pool_embeddings_ @ embedding
        chosen = []
        for label in self.classes_:
            idx = [i for i, lab in enumerate(self.pool_.labels) if lab == label]
            best = sorted(idx, key=lambda i: float(similarity[i]), reverse=True)[: self.shots]
            chosen += [(self.pool_.texts[i], label, float(similarity[i])) for i in best]
        chosen.sort(key=lambda x: x[2])  # the nearest last, next to the text
        return [(t, lab) for t, lab, _ in chosen]

    def _prefill(self, ids: list[int]) -> KVCache:
        from llmclf.runtime import inference_autocast

        cache = self.model_.new_kv_cache(len(ids))
        with torch.no_grad(), inference_autocast(self.model_, self.device_, self.dtype_):
            self.model_.hidden_states(torch.tensor([ids], device=self.device_), kv_cache=cache)
        return cache

    # --- inference ----------------------------------------------------------------------------

    def _text_ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's own part of the prompt: (nearest examples,) text and the template's end, the text cut to fit."""
        room = self.max_length_ - len(self.prefix_ids_) - len(self.first_ids_) - len(self.tail_ids_) - self.max_label_
        seqs = []
        embeddings = self._embeddings(texts) if self.pool_ is not None else None
        for i, ids in enumerate(self.tokenizer_.encode_batch(texts)):
            bos = getattr(self.tokenizer_, "bos_id", None)
            ids = ids[1:] if bos is not None and ids[:1] == [bos] else ids
            before = self.first_ids_
            if embeddings is not None:
                before = before + self._encode(self._examples_text(self._nearest_examples(texts[i], embeddings[i]))
                                               + self.head_b_)
            seqs.append(before + ids[: max(room - len(before) + len(self.first_ids_), 0)] + self.tail_ids_)
        return seqs

    def label_token_log_probs(self, texts: Sequence[str] | str, batch_size: int = 32) -> np.ndarray:
        """Per text and label, the log-probabilities of the label's tokens as the answer: (N, C, Lmax),
        0 past a label's end (`score` combines them; both scores come from one such pass)."""
        from llmclf.runtime import inference_autocast

        self._check_fitted()
        texts = self._as_texts(texts)
        seqs = self._text_ids(texts)
        per_pass = max(1, min(batch_size, ROW_TOKEN_BUDGET // (self.max_length_ * len(self.classes_))))
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths share a pass
        out = np.zeros((len(texts), len(self.classes_), self.max_label_), dtype=np.float32)
        for start in range(0, len(order), per_pass):
            idx = order[start:start + per_pass]
            cache = SharedPrefixCache.from_kv_cache(self.prefix_cache_, len(idx))
            with torch.no_grad(), inference_autocast(self.model_, self.device_, self.dtype_):
                logp = label_log_probs(self.model_, cache, [seqs[i] for i in idx], self.label_ids_,
                                       self.tokenizer_.pad_id)
            out[idx] = logp.cpu().numpy()
        return out

    def _softmax(self, token_log_probs: np.ndarray, score: str) -> np.ndarray:
        lengths = [len(ids) for ids in self.label_ids_]
        return torch.softmax(combine_scores(torch.from_numpy(token_log_probs), lengths, score), dim=-1).numpy()

    def _content_free_probabilities(self, score: str) -> np.ndarray:
        return self._softmax(self.content_free_, score).mean(axis=0)

    def probabilities_from(self, token_log_probs: np.ndarray, score: str | None = None,
                           calibrate: str | None = None) -> np.ndarray:
        """Softmax over the labels of their scores (`score`, default this classifier's) from
        `label_token_log_probs`, calibrated as `calibrate` says (default this classifier's)."""
        score = score or self.score
        probs = self._softmax(token_log_probs, score)
        if (calibrate or self.calibrate) == "content-free":
            probs = probs / self._content_free_probabilities(score)
            probs /= probs.sum(axis=1, keepdims=True)
        return probs

    def _probabilities(self, texts: list[str], batch_size: int, dropout: bool) -> np.ndarray:
        return self.probabilities_from(self.label_token_log_probs(texts, batch_size))

    def _torch_module(self) -> torch.nn.Module:
        return self.model_

    def predict_mc_dropout(self, *args: Any, **kwargs: Any):
        raise ConfigError("MC-dropout needs a trained classifier; zero-shot scoring is one deterministic pass")

    def _explain_access(self):
        raise ConfigError("explanations attribute a trained classifier's label; a zero-shot classifier scores label "
                          "words with the language model: leave out --explain, or train a classifier")

    def save(self, *_: Any, **__: Any) -> None:
        raise ConfigError("a zero-shot classifier has nothing trained to save: rebuild it from its options "
                          "(model, labels, template, shots) or train a classifier with `llmclf train`")
