"""A tiny trained GPT-2 classifier (pos/neg toy data) shared by the serving and batch-prediction tests.

Trained once per pytest session (a few seconds) into the session's base temp directory; later
callers in the same session load the saved directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

WORDS = {"pos": "great wonderful happy", "neg": "awful terrible sad"}
POSITIVE, NEGATIVE = "today: great wonderful happy", "today: awful terrible sad"


def toy_data(n: int, offset: int = 0, pos_every: int = 2):
    """`n` toy texts "item I: <words of its label>"; every `pos_every`-th one (from the first) is pos."""
    from llmclf.data.classification import LabelledTexts

    labels = ["pos" if i % pos_every == 0 else "neg" for i in range(n)]
    return LabelledTexts([f"item {i + offset}: {WORDS[lab]}" for i, lab in enumerate(labels)], labels, "toy")


def tiny_dropout_lm(out: Path, tokenizer) -> Path:
    """An llmclf checkpoint of a tiny random GPT-2 with dropout 0.1 (so RNG states matter to resume)."""
    from llmclf.config import GPTConfig
    from llmclf.loaders.checkpoint import save_checkpoint
    from llmclf.models.gpt2 import GPTModel

    torch.manual_seed(7)
    return save_checkpoint(out, GPTModel(GPTConfig(vocab_size=50257, context_length=32, emb_dim=32, n_heads=4,
                                                   n_layers=2, drop_rate=0.1)), tokenizer)


def _tiny_lm(path: Path, shared_dir: Path, drop_rate: float) -> Path:
    """A random 2-layer, 32-dim GPT-2 (seed 0) with the GPT-2 tokenizer, saved as a checkpoint at `path`."""
    from llmclf.config import GPTConfig
    from llmclf.loaders.checkpoint import save_checkpoint
    from llmclf.models.gpt2 import GPTModel
    from llmclf.tokenizer import load_gpt2_tokenizer

    tokenizer = load_gpt2_tokenizer(os.environ.get("LLMCLF_GPT2_TOKENIZER_DIR", shared_dir / "tokenizers" / "gpt2"))
    torch.manual_seed(0)
    return save_checkpoint(path, GPTModel(GPTConfig(context_length=64, emb_dim=32, n_heads=4, n_layers=2,
                                                    drop_rate=drop_rate)), tokenizer)


def tiny_classifier_dir(tmp_path_factory: pytest.TempPathFactory, shared_dir: Path) -> Path:
    """The directory of a tiny GPT-2 classifier (labels neg, pos; dropout 0.1; not calibrated: its validation
    set is its training set) saved by `fit`."""
    out = tmp_path_factory.getbasetemp() / "llmclf-tiny-classifier"
    if (out / "config.json").is_file():
        return out
    from llmclf.data.classification import LabelledTexts
    from llmclf.engines.scratch import TextClassifier

    lm = _tiny_lm(out.with_name(out.name + "-lm"), shared_dir, drop_rate=0.1)
    labels = ["pos" if i % 2 else "neg" for i in range(32)]
    data = LabelledTexts([f"item {i}: {WORDS[lab]}" for i, lab in enumerate(labels)], labels, "toy")
    clf = TextClassifier(str(lm), trainable="all", pooling="last", template=None, epochs=3, lr=3e-3, batch_size=8,
                         ensemble="none", calibration="none", log_every=1000, precision="float32")
    clf.fit(data, data, progress=False)
    tmp = out.with_name(out.name + ".tmp")
    clf.save(tmp)
    tmp.rename(out)  # complete or absent
    return out


TOPICS = {"sport": "goal match team", "money": "bank stock price", "tech": "chip code robot"}


def topic_texts(n: int, seed: int, sep: str = ","):
    """Toy multi-label texts: each names the words of one or two topics, labelled with those topics."""
    import random

    from llmclf.data.classification import LabelledTexts

    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        topics = sorted(rng.sample(sorted(TOPICS), 1 if i % 3 else 2))
        texts.append(f"note {i}: " + " and ".join(TOPICS[t] for t in topics))
        labels.append(sep.join(topics))
    return LabelledTexts(texts, labels, f"topics-{seed}", sep)


def multi_label_classifier_dir(tmp_path_factory: pytest.TempPathFactory, shared_dir: Path) -> Path:
    """A tiny GPT-2 multi-label classifier (labels money, sport, tech; a head on cached features) saved by `fit`."""
    out = tmp_path_factory.getbasetemp() / "llmclf-tiny-multi-label"
    if (out / "config.json").is_file():
        return out
    from llmclf.engines.scratch import TextClassifier

    lm = _tiny_lm(out.with_name(out.name + "-lm"), shared_dir, drop_rate=0.0)
    clf = TextClassifier(str(lm), pooling="mean", template="{text}", epochs=6, lr=0.05, batch_size=8,
                         class_weights="balanced", log_every=1000, precision="float32")
    clf.fit(topic_texts(96, 1), topic_texts(30, 2), progress=False)
    tmp = out.with_name(out.name + ".tmp")
    clf.save(tmp)
    tmp.rename(out)  # complete or absent
    return out
