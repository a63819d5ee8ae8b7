"""One classifier API over both engines.

`make_classifier(model, ...)` picks the engine for a backbone (`scratch` for llmclf's own GPT-2 and
Llama models, `hf` for encoder models through `transformers`); `load_classifier(path)` reads back a
classifier trained by either. Both give the same interface: `predict`, `predict_proba`,
`predict_mc_dropout`, `evaluate`, `info`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llmclf.engines import ENGINES, choose_engine
from llmclf.engines.base import TEST_METRICS_FILE, BaseClassifier, MCDropoutResult, NotFittedError, evaluation_report
from llmclf.engines.hf import HFClassifier
from llmclf.engines.scratch import TextClassifier
from llmclf.errors import ConfigError
from llmclf.loaders.checkpoint import read_checkpoint_config
from llmclf.training.args import TrainArgs

__all__ = ["BaseClassifier", "HFClassifier", "MCDropoutResult", "NotFittedError", "TextClassifier",
           "evaluation_report", "load_classifier", "make_classifier"]


def make_classifier(model: str, engine: str = "auto", recipe: str | None = None, **options: Any) -> BaseClassifier:
    """An untrained classifier for backbone `model`; `engine` auto picks `hf` for encoder models
    (BERT family, the packaged `all-minilm-l6-v2`) and `scratch` otherwise. `options` are the
    engine class's constructor arguments; `recipe` (e.g. "course") fills in the ones not given."""
    if engine not in ("auto", *ENGINES):
        raise ConfigError(f"engine must be auto, {' or '.join(ENGINES)}; got {engine!r}")
    if engine == "auto":
        engine = choose_engine(model)
    cls = HFClassifier if engine == "hf" else TextClassifier
    if recipe is not None:
        options = TrainArgs.recipe(recipe, engine, options)
    return cls(model, **options)


def load_classifier(path: str | os.PathLike, **kwargs: Any) -> BaseClassifier:
    """A trained classifier from a directory written by either engine (or a bare state_dict file,
    e.g. the book's `review_classifier.pth`, with `base_config`): `load_classifier(DIR).predict([...])`.

    Keyword arguments go to the engine's `load` (precision, device; for state_dict files also
    base_config, num_classes, labels, pooling, max_length, tokenizer_dir)."""
    path = Path(path)
    engine = "scratch"
    if path.is_dir():
        engine = read_checkpoint_config(path).get("engine", "scratch")
    if engine == "hf":
        scratch_only = sorted(k for k, v in kwargs.items()
                              if v is not None and k not in ("precision", "device", "max_length"))
        if scratch_only:
            raise ConfigError(f"{path} was trained by the Transformers engine; {', '.join(scratch_only)} "
                              "apply to from-scratch models only")
        clf: BaseClassifier = HFClassifier.load(path, **{k: v for k, v in kwargs.items() if v is not None})
    else:
        clf = TextClassifier.load(path, **kwargs)
    test_file = path / TEST_METRICS_FILE
    if path.is_dir() and test_file.is_file():
        try:
            clf.config_["test_metrics"] = json.loads(test_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            pass  # informational only
    return clf
