"""What every engine's classifier shares: prediction, MC-dropout, evaluation and model info.

An engine implements `_probabilities` (one forward pass over texts, optionally with dropout
active), `fit`, `save` and `load`; everything a user calls afterwards lives here, so that
`evaluate`, `predict` and `serve` never need to know which engine trained a model.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from llmclf import distributed
from llmclf.data.classification import (
    AUTO_TEMPLATE,
    LabelledTexts,
    apply_template,
    encode_texts,
    label_order,
    resolve_template,
    template_suffix_tokens,
)
from llmclf.errors import ConfigError, DataError, LlmclfError
from llmclf.loaders.spec import chat_template_for
from llmclf.loaders.tensors import WriteError
from llmclf.ngrams import NgramModel
from llmclf.training.args import TrainArgs
from llmclf.training.metrics import classification_metrics, plot_confusion_matrix
from llmclf.training.state import RunFinishedError, finish_run, has_unfinished_run, prepare_run, run_fingerprint

log = logging.getLogger(__name__)

METRICS_LOG_FILE = "metrics.jsonl"
HISTORY_FILE = "history.json"
TEST_METRICS_FILE = "test_metrics.json"


class NotFittedError(LlmclfError):
    """`predict`/`evaluate`/`save` was called before `fit` or `load`."""


def prediction_record(classes: Sequence[str], probabilities: Sequence[float], std: Sequence[float] | None = None,
                      *, threshold: float | None = None, confident: bool | None = None) -> dict[str, Any]:
    """The JSON-ready prediction for one text, as `predict --json`, `.jsonl` output and `serve` give it.

    Keys in this order: `label` (the class of highest probability; with MC-dropout, of highest
    mean), `confident`, `probabilities` and `std` (class -> float). `confident` is there when
    given, or with `std` (MC-dropout) or a `threshold`: whether the label's probability reached
    `threshold` (always true without one). `std` is there when given.
    """
    best = int(np.argmax(probabilities))
    record: dict[str, Any] = {"label": classes[best]}
    if confident is None and (std is not None or threshold is not None):
        confident = threshold is None or bool(probabilities[best] >= threshold)
    if confident is not None:
        record["confident"] = bool(confident)
    record["probabilities"] = dict(zip(classes, map(float, probabilities), strict=True))
    if std is not None:
        record["std"] = dict(zip(classes, map(float, std), strict=True))
    return record


@dataclass
class MCDropoutResult:
    """Monte Carlo dropout: per text, the mean and standard deviation of each class's probability
    over `passes` forward passes with dropout active, and the resulting label."""

    labels: list[str]
    mean: np.ndarray  # (n_texts, n_classes), columns in `classes` order
    std: np.ndarray
    confident: list[bool]  # the label's mean probability reached the threshold
    classes: list[str]
    passes: int
    threshold: float | None

    def records(self) -> list[dict[str, Any]]:
        """One `prediction_record` per text: label, confident, probabilities (mean) and std."""
        return [prediction_record(self.classes, mean, std, confident=ok)
                for ok, mean, std in zip(self.confident, self.mean, self.std, strict=True)]


@contextmanager
def dropout_active(model: nn.Module, rate: float | None = None) -> Iterator[None]:
    """Train mode (dropout on) for MC-dropout passes; `rate` overrides every dropout probability,
    for models trained without dropout. Restores mode and rates afterwards."""
    was_training = model.training
    saved = {m: m.p for m in model.modules() if isinstance(m, nn.Dropout)}
    model.train()
    if rate is not None:
        for m in saved:
            m.p = rate
    try:
        yield
    finally:
        for m, p in saved.items():
            m.p = p
        model.train(was_training)


class BaseClassifier:
    """Engine-independent parameters and inference (see `TextClassifier`, `HFClassifier`).

    Parameters follow scikit-learn: `model` (the backbone) and the training options of
    `llmclf.training.args.TrainArgs` that apply to the engine, stored as given by `__init__`,
    validated together in `fit`; `get_params`/`set_params` make `sklearn.base.clone` work.
    """

    engine = ""
    supports_mc_dropout = True  # the ONNX backend's graph has no dropout
    extra_params: tuple[str, ...] = ()  # constructor arguments besides `model` and the TrainArgs options
    classes_: list[str]
    max_length_: int
    config_: dict[str, Any]

    def __init__(self, model: str, **params: Any) -> None:
        if "model_options" in params and "model_options" not in self.extra_params:
            raise ConfigError(f"model options ({', '.join(params['model_options'] or {})}: --random-init, "
                              "--base-config, --context-length, --drop-rate, --qkv-bias, --tokenizer-dir) apply to "
                              f"the scratch engine only; the {self.engine} engine loads {model} as it is")
        TrainArgs.check_names(self.engine, set(params) - set(self.extra_params))
        self.model = model
        for name, default in TrainArgs.defaults(self.engine).items():
            setattr(self, name, params.get(name, default))
        for name in self.extra_params:
            setattr(self, name, params.get(name))

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor arguments (scikit-learn's estimator API)."""
        names = ("model", *TrainArgs.names(self.engine), *self.extra_params)
        return {name: getattr(self, name) for name in names}

    def set_params(self, **params: Any) -> BaseClassifier:
        """Change constructor arguments (checked by name here, by value in `fit`); returns self."""
        TrainArgs.check_names(self.engine, set(params) - {"model", *self.extra_params})
        for name, value in params.items():
            setattr(self, name, value)
        return self

    def train_args(self) -> TrainArgs:
        """The training options as one validated `TrainArgs` (every problem reported at once)."""
        return TrainArgs.for_engine(self.engine, **{n: getattr(self, n) for n in TrainArgs.names(self.engine)})

    def training_options(self) -> dict[str, Any]:
        """The TrainArgs options of this engine as set (saved in config.json under "training")."""
        return {n: getattr(self, n) for n in TrainArgs.names(self.engine)}

    def __repr__(self) -> str:
        defaults = TrainArgs.defaults(self.engine)
        changed = {k: v for k, v in self.get_params().items() if k == "model" or defaults.get(k, None) != v}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in changed.items())})"

    @classmethod
    def _saved_params(cls, config: dict[str, Any]) -> dict[str, Any]:
        """The training options saved in a model's config.json that this engine knows."""
        return {k: v for k, v in (config.get("training") or {}).items() if k in TrainArgs.names(cls.engine)}

    # --- what fit shares ------------------------------------------------------------------

    def _learn_classes(self, train: LabelledTexts, val: LabelledTexts) -> None:
        self.classes_ = label_order(train.labels)
        if len(self.classes_) < 2:
            raise DataError(f"{train.source}: training data has a single label {self.classes_}; need 2 or more")
        unseen = sorted(set(val.labels) - set(self.classes_))
        if unseen:
            raise DataError(f"{val.source}: labels {unseen} do not occur in the training data")
        chat = chat_template_for(str(self.model)) if self.template == AUTO_TEMPLATE else None
        self.template_ = resolve_template(self.template, chat, self.classes_)

    def _prepare_run(self, args: TrainArgs, train: LabelledTexts, val: LabelledTexts,
                     out_dir: str | os.PathLike | None, resume: bool) -> bool | None:
        """Fingerprint the run (`self.run_`) and check `out_dir` for `resume`: True to resume, False
        to start; None when `resume` found this run finished (its model is then loaded into self)."""
        options = {**args.result_options(self.engine), "input_template": self.template_}  # `auto`, filled in
        self.run_ = run_fingerprint(self.engine, str(self.model), options, train, val,
                                    getattr(self, "model_options", None))
        distributed.check_same("training options or data", self.run_)
        if distributed.restarted() and out_dir is not None and has_unfinished_run(out_dir):
            resume = True  # the elastic agent restarted the workers: continue from the last training state
        try:
            return prepare_run(out_dir, self.run_, resume)
        except RunFinishedError as done:
            log.info("%s: loading its model", done)
            loaded = type(self).load(out_dir, precision=self.precision, device=self.device)
            self.__dict__.update({k: v for k, v in vars(loaded).items() if k.endswith("_")})
            self.finished_before_ = str(done)
            metrics = self.config_.get("metrics") or {}
            self.val_metrics_, self.train_seconds_ = metrics.get("validation"), metrics.get("train_seconds") or 0.0
            return None

    # --- for engines to implement ---------------------------------------------------------

    def _probabilities(self, texts: list[str], batch_size: int, dropout: bool) -> np.ndarray:
        raise NotImplementedError

    def _torch_module(self) -> nn.Module:
        raise NotImplementedError

    # --- shared -----------------------------------------------------------------------------

    def _model_inputs(self, texts: list[str]) -> list[str]:
        """What the model reads for these texts: each put into the template, if there is one
        (`template_`: the template with the chat format and class names filled in, see `fit`)."""
        return apply_template(self.template_, texts)

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """The token ids the model reads for `texts`: templated, and cut to `max_length_` as in training
        (llmclf's tokenizers keep the template's end; Transformers' tokenizers cut the end)."""
        from llmclf.tokenizer import GPT2Tokenizer, HFTokenizer

        texts = self._model_inputs(list(texts))
        if isinstance(self.tokenizer_, GPT2Tokenizer | HFTokenizer):
            keep_last = template_suffix_tokens(self.template_, self.tokenizer_)
            return encode_texts(texts, self.tokenizer_, self.max_length_, keep_last=keep_last).ids
        return self.tokenizer_(texts, truncation=True, max_length=self.max_length_)["input_ids"]

    def _restore_fitted(self, config: dict[str, Any], model_dir: Path) -> None:
        """`template_` and `ngrams_` of a model loaded from `model_dir` (`classes_` set). The template
        as saved; older directories saved only the template option (then concrete), a bare
        state_dict file none."""
        self.template_ = config["input_template"] if "input_template" in config else \
            (config.get("training") or {}).get("template")
        trained_with = (config.get("training") or {}).get("ensemble", "none")
        self.ngrams_ = NgramModel.load(model_dir, len(self.classes_)) if trained_with == "tfidf" else None

    def _save_finished_run(self, out_dir: str | os.PathLike, state_dir: Path) -> None:
        """Save the fitted model and its plots, then close the run (`checkpoints/` goes). A save that
        fails (WriteError: disk full ...) keeps the run's last training state, so `--resume` saves it later."""
        try:
            self.save(out_dir)
            self._plot(Path(out_dir))
        except WriteError as exc:
            exc.note += (f"; the finished run's training state is kept in {state_dir}: make room, then rerun "
                         "with --resume to save the model")
            raise
        finish_run(out_dir)

    def _plot(self, out_dir: Path) -> None:
        raise NotImplementedError

    # --- the n-gram ensemble (`ensemble="tfidf"`, llmclf.ngrams) ---------------------------------

    def _fit_ensemble(self, train: LabelledTexts, val: LabelledTexts, val_probs: np.ndarray) -> np.ndarray:
        """With `ensemble="tfidf"`, fit `ngrams_` on `train` and its weights on `val`, given the
        language model's validation probabilities; returns the whole classifier's."""
        self.ngrams_ = None
        if self.ensemble == "none":
            return val_probs
        start = time.perf_counter()
        ngrams = NgramModel.fit(train.texts, self._label_ids(train), len(self.classes_))
        self.ngrams_ = ngrams.fit_weights(val_probs, val.texts, self._label_ids(val))
        log.info("n-gram ensemble fitted in %.1f s: weights %.3f (language model), %.3f (n-grams)",
                 time.perf_counter() - start, *self.ngrams_.weights)
        return self.ngrams_.blend(val_probs, val.texts)

    def _with_ngrams(self, probs: np.ndarray, texts: list[str], scores: np.ndarray | None = None) -> np.ndarray:
        """The language model's probabilities, combined with the n-gram model's if there is one."""
        if getattr(self, "ngrams_", None) is None:
            return probs
        return self.ngrams_.combine(probs, self.ngrams_.scores(texts) if scores is None else scores)

    def _save_ngrams(self, out_dir: Path) -> None:
        if getattr(self, "ngrams_", None) is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.ngrams_.save(out_dir)

    def _check_fitted(self) -> None:
        if not hasattr(self, "classes_") or not hasattr(self, "max_length_"):
            raise NotFittedError(f"this {type(self).__name__} is not trained yet: call fit() or load_classifier()")

    @staticmethod
    def _as_texts(texts: Sequence[str] | str) -> list[str]:
        if isinstance(texts, str):
            return [texts]
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise DataError(f"text {i} is a {type(text).__name__}, not a string")
        return texts

    def _label_ids(self, data: LabelledTexts) -> list[int]:
        index = {label: i for i, label in enumerate(self.classes_)}
        unknown = sorted(set(data.labels) - set(index))
        if unknown:
            raise DataError(f"{data.source}: labels {unknown} are not among the model's {self.classes_}")
        return [index[label] for label in data.labels]

    def predict_proba(self, texts: Sequence[str] | str, batch_size: int = 32) -> np.ndarray:
        """Class probabilities (N, len(classes_)), columns in `classes_` order, rows in input order;
        one deterministic pass (dropout off)."""
        self._check_fitted()
        texts = self._as_texts(texts)
        if not texts:
            return np.zeros((0, len(self.classes_)), dtype=np.float32)
        return self._with_ngrams(self._probabilities(texts, batch_size, dropout=False), texts)

    def predict(self, texts: Sequence[str] | str, batch_size: int = 32) -> list[str]:
        """Predicted label names, in input order."""
        return [self.classes_[i] for i in self.predict_proba(texts, batch_size).argmax(axis=1)]

    def predict_mc_dropout(self, texts: Sequence[str] | str, passes: int = 5, threshold: float | None = None,
                           batch_size: int = 32, dropout_rate: float | None = None,
                           seed: int | None = None) -> MCDropoutResult:
        """Monte Carlo dropout (the course notebook's uncertainty estimate): `passes` forward passes
        with dropout active; mean and standard deviation of each class's probability. The label is
        the argmax of the means, whatever the threshold; `threshold` only sets `confident` (the
        label's mean probability reached it; all true without a threshold).

        `dropout_rate` overrides the model's dropout probability during these passes (needed for
        models whose dropout is 0, e.g. SmolLM2 or GPT-2 fine-tuned without dropout).
        """
        self._check_fitted()
        if passes < 1:
            raise ConfigError(f"MC-dropout needs at least 1 pass, got {passes}")
        if threshold is not None and not 0.0 < threshold <= 1.0:
            raise ConfigError(f"threshold must be in (0, 1], got {threshold}")
        if dropout_rate is not None and not 0.0 <= dropout_rate < 1.0:
            raise ConfigError(f"dropout rate must be in [0, 1), got {dropout_rate}")
        texts = self._as_texts(texts)
        n_classes = len(self.classes_)
        if not texts:
            empty = np.zeros((0, n_classes), dtype=np.float32)
            return MCDropoutResult([], empty, empty.copy(), [], list(self.classes_), passes, threshold)
        if seed is not None:
            torch.manual_seed(seed)
        scores = self.ngrams_.scores(texts) if getattr(self, "ngrams_", None) is not None else None
        with dropout_active(self._torch_module(), dropout_rate):
            runs = np.stack([self._with_ngrams(self._probabilities(texts, batch_size, dropout=True), texts, scores)
                             for _ in range(passes)])
        mean, std = runs.mean(axis=0), runs.std(axis=0)
        best = mean.argmax(axis=1)
        confident = [threshold is None or bool(mean[i, best[i]] >= threshold) for i in range(len(texts))]
        labels = [self.classes_[int(i)] for i in best]
        return MCDropoutResult(labels, mean, std, confident, list(self.classes_), passes, threshold)

    def evaluate(self, data: LabelledTexts, batch_size: int = 32) -> dict:
        """Accuracy, per-class precision/recall/F1, macro-F1, confusion matrix, loss and n."""
        self._check_fitted()
        y_true = self._label_ids(data)  # checked first: unknown labels fail before any inference
        return self._metrics(y_true, self.predict_proba(data.texts, batch_size))

    def _open_tracker(self, args: TrainArgs, out_dir: str | os.PathLike | None, resuming: bool, step: int,
                      train: LabelledTexts, val: LabelledTexts, n_parameters: int, n_trainable: int):
        """`--report-to`'s tracker for this run (rank 0; `llmclf.tracking`), with the options, the data's
        and the model's sizes logged as its parameters."""
        from llmclf.tracking import open_tracker

        tracker = open_tracker(args.report_to, out_dir if distributed.is_main() else None, resuming, step)
        tracker.log_params({"engine": self.engine, "backbone": str(self.model), **args.to_dict(self.engine),
                            "classes": self.classes_, "train_examples": len(train), "validation_examples": len(val),
                            "parameters": n_parameters, "trainable_parameters": n_trainable})
        return tracker

    def _metrics(self, y_true: list[int], probs: np.ndarray) -> dict:
        y_pred = probs.argmax(axis=1).tolist()
        picked = probs[np.arange(len(y_true)), y_true]
        loss = float(-np.log(np.clip(picked, 1e-12, 1.0)).mean()) if y_true else float("nan")
        return classification_metrics(y_true, y_pred, self.classes_, loss)

    def info(self) -> dict[str, Any]:
        """What serving and users need to know: labels, backbone, engine, max_length, metrics."""
        self._check_fitted()
        config = getattr(self, "config_", {}) or {}
        metrics = config.get("metrics")
        if metrics is None and hasattr(self, "val_metrics_"):  # fitted in this process, not loaded
            metrics = {"validation": self.val_metrics_, "train_seconds": getattr(self, "train_seconds_", None)}
        return {"labels": list(self.classes_), "backbone": str(config.get("backbone", getattr(self, "model", ""))),
                "engine": self.engine, "max_length": self.max_length_, "metrics": metrics,
                "test_metrics": config.get("test_metrics")}


def evaluation_report(clf: BaseClassifier, data: LabelledTexts, plots_dir: str | os.PathLike | None = None) -> dict:
    """`clf.evaluate(data)`, plus the confusion matrix as PNG in `plots_dir`."""
    metrics = clf.evaluate(data)
    if plots_dir is not None:
        plot_confusion_matrix(metrics["confusion_matrix"], metrics["labels"], Path(plots_dir) / "confusion_matrix.png")
    return metrics
