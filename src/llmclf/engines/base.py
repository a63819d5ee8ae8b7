"""What every engine's classifier shares: prediction, MC-dropout, evaluation and model info.

An engine implements `_probabilities` (one forward pass over texts, optionally with dropout
active), `fit`, `save` and `load`; everything a user calls afterwards lives here, so that
`evaluate`, `predict` and `serve` never need to know which engine trained a model.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from llmclf import distributed, long_text
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
from llmclf.explain import DEFAULT_STEPS, Explanation, ModelAccess, explain
from llmclf.loaders.spec import chat_template_for
from llmclf.loaders.tensors import WriteError
from llmclf.multilabel import LabelThresholds, multilabel_metrics, plot_per_label
from llmclf.ngrams import NgramModel, fit_blend_weights, ngram_counts
from llmclf.sentence_encoder import SentenceEncoderModel, sentence_embeddings
from llmclf.training.args import TrainArgs, ensemble_encoder
from llmclf.training.calibration import (
    DecisionThreshold,
    apply_temperature,
    calibration_scores,
    decide,
    fit_temperature,
    reliability_bins,
    tune_threshold,
)
from llmclf.training.metrics import classification_metrics, plot_calibration, plot_confusion_matrix
from llmclf.training.state import RunFinishedError, finish_run, has_unfinished_run, prepare_run, run_fingerprint

log = logging.getLogger(__name__)

# refit_head(fold, fit, held): the language model's probabilities of training texts `held` from a head trained
# on training texts `fit` (fold number `fold`, for its seed)
HeadRefit = Callable[[int, list[int], list[int]], np.ndarray]

METRICS_LOG_FILE = "metrics.jsonl"
HISTORY_FILE = "history.json"
TEST_METRICS_FILE = "test_metrics.json"


class NotFittedError(LlmclfError):
    """`predict`/`evaluate`/`save` was called before `fit` or `load`."""


def prediction_record(classes: Sequence[str], probabilities: Sequence[float], std: Sequence[float] | None = None,
                      *, threshold: float | None = None, confident: bool | None = None,
                      decision: DecisionThreshold | None = None,
                      multi_label: LabelThresholds | None = None) -> dict[str, Any]:
    """The JSON-ready prediction for one text, as `predict --json`, `.jsonl` output and `serve` give it.

    Keys in this order: `label` (the class of highest probability, with MC-dropout of highest
    mean; with a binary `decision` threshold, the positive class when its probability reaches the
    threshold), `confident`, `probabilities`, `std` (class -> float) and `decision_threshold`.
    `confident` is there when given, or with `std` (MC-dropout) or a `threshold`: whether the
    label's probability reached `threshold` (always true without one). `std` is there when given;
    `decision_threshold` ({"label": positive class, "threshold": t}) with a `decision`.

    A multi-label model (`multi_label`, its per-label thresholds) gives `label` (the chosen labels joined
    by its separator, in the model's order), `labels` (every label whose probability reaches its threshold,
    the most probable first; at least one), `confident` (with a `threshold`: every chosen label's
    probability reached it), `probabilities` and `thresholds` (label -> its threshold).
    """
    if multi_label is not None:
        chosen = multi_label.chosen(probabilities)
        names = [classes[k] for k in chosen]
        out: dict[str, Any] = {"label": multi_label.sep.join(c for c in classes if c in names), "labels": names}
        if threshold is not None:
            out["confident"] = all(probabilities[k] >= threshold for k in chosen)
        out["probabilities"] = dict(zip(classes, map(float, probabilities), strict=True))
        out["thresholds"] = dict(zip(classes, map(float, multi_label.thresholds), strict=True))
        return out
    best = int(decide(np.asarray(probabilities, dtype=np.float64)[None], decision)[0])
    record: dict[str, Any] = {"label": classes[best]}
    if confident is None and (std is not None or threshold is not None):
        confident = threshold is None or bool(probabilities[best] >= threshold)
    if confident is not None:
        record["confident"] = bool(confident)
    record["probabilities"] = dict(zip(classes, map(float, probabilities), strict=True))
    if std is not None:
        record["std"] = dict(zip(classes, map(float, std), strict=True))
    if decision is not None:
        record["decision_threshold"] = {"label": classes[decision.positive], "threshold": decision.threshold}
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
    decision: DecisionThreshold | None = None  # the model's binary decision threshold, if it has one

    def records(self) -> list[dict[str, Any]]:
        """One `prediction_record` per text: label, confident, probabilities (mean) and std."""
        return [prediction_record(self.classes, mean, std, confident=ok, decision=self.decision)
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
        """The training options saved in a model's config.json that this engine knows (an option it did
        not save yet: the value it was trained with)."""
        saved = config.get("training") or {}
        known = {k: v for k, v in saved.items() if k in TrainArgs.names(cls.engine)}
        return {**TrainArgs.saved_before(cls.engine), **known} if saved else known

    # --- what fit shares ------------------------------------------------------------------

    def _learn_classes(self, train: LabelledTexts, val: LabelledTexts) -> None:
        sep = train.label_sep or getattr(self, "label_sep", None)
        self.label_thresholds_ = None if sep is None else LabelThresholds([], sep)
        names = self._label_names(train)
        self.classes_ = label_order(names)
        if len(self.classes_) < 2:
            raise DataError(f"{train.source}: training data has a single label {self.classes_}; need 2 or more")
        unseen = sorted(set(self._label_names(val)) - set(self.classes_), key=str)
        if unseen:
            raise DataError(f"{val.source}: labels {unseen} do not occur in the training data")
        if self.label_thresholds_ is not None:
            self.label_thresholds_.thresholds = [0.5] * len(self.classes_)
            self._check_multi_label_options()
        elif (encoder := ensemble_encoder(self.ensemble)) is not None:  # missing? say so before training
            from llmclf.loaders.encoders import resolve_hf_model

            resolve_hf_model(encoder)
        for name in ("tune_threshold", "positive_label"):
            if getattr(self, name) is not None and len(self.classes_) != 2:
                raise ConfigError(f"{TrainArgs.flag(name)} {getattr(self, name)}: decision thresholds are for two "
                                  f"classes, and {train.source} has {len(self.classes_)} ({', '.join(self.classes_)}); "
                                  "leave it out (the label is then the most probable class)")
        if self.positive_label is not None and self.positive_label not in self.classes_:
            raise DataError(f"--positive-label {self.positive_label!r} is not a label of {train.source} "
                            f"({', '.join(self.classes_)})")
        chat = chat_template_for(str(self.model)) if self.template == AUTO_TEMPLATE else None
        self.template_ = resolve_template(self.template, chat, self.classes_)
        self.long_text_, self.aggregate_ = self.long_text, self.aggregate  # (the ONNX backend reads them saved)

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

    def _explain_access(self) -> ModelAccess:
        """How `llmclf.explain` runs this engine's model: forward pass, token embeddings, padding."""
        raise NotImplementedError

    def _long_text_windows(self, args: TrainArgs, train: LabelledTexts, val: LabelledTexts, limit: int,
                           hard_limit: int) -> tuple[tuple[LabelledTexts, list[int]], ...] | None:
        """With --long-text chunk: `max_length_` set to the window (its default capped at `limit`, any
        window at `hard_limit`), and (windows, text of each window) of `train` and of `val`; else None."""
        length = long_text.fit_length(args.long_text, args.max_length, limit)
        if length is None:
            return None
        self.max_length_ = length
        w = long_text.resolve(self, args.long_text, args.aggregate, length, hard_limit)
        parts = long_text.expand(self, train, w), long_text.expand(self, val, w)
        log.info("--long-text %s: windows of %d tokens (%d of text, overlap %d): %d training, %d validation",
                 args.long_text, w.length, w.text_tokens, w.stride, len(parts[0][1]), len(parts[1][1]))
        return parts

    def _text_probabilities(self, texts: list[str], batch_size: int, dropout: bool) -> np.ndarray:
        """`_probabilities` of whole texts: with `--long-text chunk`, their windows' aggregated (`llmclf.long_text`)."""
        return long_text.probabilities(self, texts, batch_size, dropout)

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
        """`template_`, `ngrams_` and `encoder_` of a model loaded from `model_dir` (`classes_` set). The template
        as saved; older directories saved only the template option (then concrete), a bare
        state_dict file none."""
        self.template_ = config["input_template"] if "input_template" in config else \
            (config.get("training") or {}).get("template")
        multi = config.get("multi_label")
        self.label_thresholds_ = None if not multi else LabelThresholds.from_config(
            multi, self.classes_, f"{model_dir}/config.json")
        trained_with = (config.get("training") or {}).get("ensemble", "none")
        encoder = ensemble_encoder(trained_with)
        blended = trained_with != "none" and not multi
        self.ngrams_ = NgramModel.load(model_dir, len(self.classes_), 2 if encoder is None else 3) if blended else None
        self.encoder_ = SentenceEncoderModel.load(model_dir, encoder, len(self.classes_)) \
            if blended and encoder is not None else None
        self.temperature_, self.decision_ = 1.0, None  # older directories: uncalibrated, arg-max
        calibration = config.get("calibration")
        if isinstance(calibration, dict) and calibration.get("temperature") is not None:
            self.temperature_ = float(calibration["temperature"])
            if not self.temperature_ > 0:
                raise ConfigError(f"{model_dir}/config.json: calibration temperature must be > 0, got "
                                  f"{self.temperature_}")
        decision = config.get("decision_threshold")
        if isinstance(decision, dict) and decision.get("threshold") is not None:
            if len(self.classes_) != 2 or decision.get("label") not in self.classes_:
                raise ConfigError(f"{model_dir}/config.json: decision_threshold {decision} does not fit the labels "
                                  f"{self.classes_} (it needs two, one of them its label)")
            self.decision_ = DecisionThreshold(self.classes_.index(decision["label"]), float(decision["threshold"]))
            self.decision_metric_ = decision.get("metric")
        long_text.restore(self, config, str(model_dir))

    def fitted_config(self) -> dict[str, Any]:
        """What config.json holds of the fitting after training: the calibration temperature and the
        decision threshold (ONNX exports copy it into their sidecar)."""
        decision, metric = getattr(self, "decision_", None), getattr(self, "decision_metric_", None)
        multi = self.label_thresholds
        return {**({} if multi is None else {"multi_label": multi.to_config(self.classes_)}),
                "calibration": {"method": "temperature", "temperature": getattr(self, "temperature_", 1.0)},
                "decision_threshold": None if decision is None else {
                    "label": self.classes_[decision.positive], "threshold": decision.threshold,
                    **({"metric": metric} if metric is not None else {})}}

    def _saved_metrics(self) -> dict[str, Any]:
        """config.json's "metrics": validation metrics, training time and size, and the reports of the
        blend, the calibration and the decision threshold fitted after training."""
        return {"validation": getattr(self, "val_metrics_", None),
                "train_seconds": getattr(self, "train_seconds_", None),
                "trainable_parameters": getattr(self, "n_trainable_", None),
                "ensemble": getattr(self, "ensemble_report_", None),
                "calibration": getattr(self, "calibration_report_", None),
                "decision_threshold": getattr(self, "threshold_report_", None)}

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

    # --- after training: the n-gram blend, calibration and decision threshold ---------------------

    def _finish_fit(self, train: LabelledTexts, val: LabelledTexts, val_probs: np.ndarray,
                    refit_head: HeadRefit | None = None, progress: bool = False) -> dict:
        """Fit what follows training on the language model's validation probabilities `val_probs`: the
        blend (`ensemble`), the temperature (`calibration`) and the decision threshold
        (`tune_threshold`). `refit_head(fold, fit, held)` (engines that can refit their head cheaply) gives
        the language model's probabilities of training texts `held` from a head trained on `fit`.
        Returns the validation metrics of the whole classifier."""
        y_val = np.asarray(self._label_ids(val))
        if self.label_thresholds is not None:
            return self._finish_multi_label_fit(y_val, val_probs)
        probs = self._fit_ensemble(train, val, val_probs, refit_head, progress)
        self.temperature_, self.calibration_report_ = 1.0, None
        if self.calibration == "temperature":
            before = calibration_scores(probs, y_val)
            self.temperature_ = fit_temperature(probs, y_val)
            probs = apply_temperature(probs, self.temperature_)
            after = calibration_scores(probs, y_val)
            self.calibration_report_ = {"method": "temperature", "temperature": self.temperature_,
                                        "validation_before": before, "validation_after": after}
            log.info("temperature %.3f fitted on the validation set: log-loss %.4f -> %.4f, ECE %.4f -> %.4f",
                     self.temperature_, before["log_loss"], after["log_loss"], before["ece"], after["ece"])
        self.decision_, self.decision_metric_, self.threshold_report_ = None, None, None
        if self.tune_threshold is not None:
            positive = self._positive_index()
            threshold, report = tune_threshold(probs[:, positive], y_val == positive, self.tune_threshold)
            self.threshold_report_ = {"label": self.classes_[positive], "threshold": threshold, **report}
            if threshold is None:
                log.warning("--tune-threshold %s: no threshold reaches it on the validation set (best: %s); the "
                            "label stays the most probable class", self.tune_threshold, report["best_reachable"])
            else:
                self.decision_, self.decision_metric_ = DecisionThreshold(positive, threshold), report["metric"]
                log.info("decision threshold %.4f on p(%s) for %s: validation precision %.4f, recall %.4f, F1 %.4f",
                         threshold, self.classes_[positive], report["metric"], report["precision"],
                         report["recall"], report["f1"])
        return self._metrics(y_val.tolist(), probs)

    def _finish_multi_label_fit(self, y_val: np.ndarray, val_probs: np.ndarray) -> dict:
        """Multi-label: no blend, calibration nor binary threshold; a threshold per label tuned on validation."""
        from llmclf.multilabel import tune_thresholds

        self.ngrams_, self.encoder_, self.ensemble_report_ = None, None, None
        self.temperature_, self.calibration_report_ = 1.0, None
        self.decision_, self.decision_metric_, self.threshold_report_ = None, None, None
        before = multilabel_metrics(y_val, val_probs, self.classes_, None)
        self.label_thresholds_.thresholds = tune_thresholds(val_probs, y_val)
        after = self._metrics(y_val.tolist(), val_probs)
        self.threshold_report_ = {"per_label": after["thresholds"], "metric": "f1",
                                  "validation_macro_f1": {"at_0.5": before["macro_f1"], "tuned": after["macro_f1"]}}
        log.info("per-label thresholds tuned on the validation set (F1): %s; validation macro-F1 %.4f -> %.4f",
                 ", ".join(f"{c} {t:.2f}" for c, t in after["thresholds"].items()), before["macro_f1"],
                 after["macro_f1"])
        return after

    def _positive_index(self) -> int:
        """The positive class of a binary decision threshold: `positive_label`, else the second label."""
        label = getattr(self, "positive_label", None)
        return self.classes_.index(label) if label is not None else 1

    def set_decision_threshold(self, threshold: float | None, label: str | None = None) -> None:
        """Decide binary labels by `threshold` on the probability of `label` (default: the model's
        tuned positive class, else the second label) instead of the saved decision; None: the most
        probable label."""
        self._check_fitted()
        self.decision_metric_ = None  # set by hand, not tuned
        if threshold is None:
            self.decision_ = None
            return
        if self.label_thresholds is not None:
            raise ConfigError("a decision threshold is for one binary decision; this multi-label model has a "
                              "threshold per label (config.json, multi_label)")
        if len(self.classes_) != 2:
            raise ConfigError(f"a decision threshold is for two classes; this model has {len(self.classes_)} "
                              f"({', '.join(self.classes_)})")
        if not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"decision threshold must be in [0, 1], got {threshold}")
        if label is not None and label not in self.classes_:
            raise ConfigError(f"{label!r} is not a label of this model ({', '.join(self.classes_)})")
        saved = getattr(self, "decision_", None)
        positive = self.classes_.index(label) if label is not None else (
            saved.positive if saved is not None else self._positive_index())
        self.decision_ = DecisionThreshold(positive, float(threshold))

    def _fit_ensemble(self, train: LabelledTexts, val: LabelledTexts, val_probs: np.ndarray,
                      refit_head: HeadRefit | None, progress: bool = False) -> np.ndarray:
        """With `ensemble="tfidf"`, fit `ngrams_` on `train` (and with `tfidf+ENCODER`, `encoder_`: a
        regression on the sentence encoder's embeddings) and the blend weights (`llmclf.ngrams`): with
        `blend="log"`, on out-of-fold predictions of `ensemble_folds` folds of `train` plus `val` when the
        head can be refit (`refit_head`), else on `val`; with `blend="mean"`, equal; returns the blend's
        validation probabilities."""
        self.ngrams_, self.encoder_, self.ensemble_report_ = None, None, None
        if self.ensemble == "none":
            return val_probs
        start = time.perf_counter()
        n_classes, y_train, y_val = len(self.classes_), np.asarray(self._label_ids(train)), self._label_ids(val)
        counts = ngram_counts(train.texts)
        ngrams = NgramModel.fit_counts(counts, y_train, n_classes)
        members = {"ngrams": (lambda fit: NgramModel.fit_counts(counts[fit], y_train[fit], n_classes),
                              lambda model, held: model.scores([train.texts[i] for i in held]))}
        val_parts = [np.log(np.clip(val_probs, 1e-12, 1.0)), ngrams.scores(val.texts)]
        encoder_name = ensemble_encoder(self.ensemble)
        if encoder_name is not None:
            embedded = sentence_embeddings(encoder_name, train.texts + val.texts, progress=progress)
            train_emb, val_emb = embedded[:len(train)], embedded[len(train):]
            self.encoder_ = SentenceEncoderModel.fit(encoder_name, train_emb, y_train, n_classes, self.seed)
            c = self.encoder_.c  # kept for the out-of-fold refits
            members["encoder"] = (
                lambda fit: SentenceEncoderModel.fit_embeddings(encoder_name, train_emb[fit], y_train[fit],
                                                                n_classes, c),
                lambda model, held: model.scores_of(train_emb[held]))
            val_parts.append(self.encoder_.scores_of(val_emb))
        val_only = fit_blend_weights(val_parts, y_val)
        folds, why_not = self.ensemble_folds, None
        smallest = int(np.bincount(y_train, minlength=n_classes).min())
        if folds == 0:
            why_not = "--ensemble-folds 0"
        elif refit_head is None:
            why_not = self._why_no_refit()
        elif smallest < folds:
            why_not = f"a class has {smallest} training text(s), fewer than {folds} folds"
        if self.blend == "mean":
            weights, fitted_on = np.ones(len(val_parts)), "nothing (--blend mean: equal weights)"
        elif why_not is None:
            from sklearn.model_selection import StratifiedKFold

            oof = [np.zeros((len(y_train), n_classes)) for _ in range(1 + len(members))]
            splits = StratifiedKFold(folds, shuffle=True, random_state=self.seed).split(y_train, y_train)
            for fold, (fit, held) in enumerate(splits):
                oof[0][held] = np.log(np.clip(refit_head(fold, fit.tolist(), held.tolist()), 1e-12, 1.0))
                for part, (refit, scores) in zip(oof[1:], members.values(), strict=True):
                    part[held] = scores(refit(fit), held)
            weights = fit_blend_weights([np.vstack([o, v]) for o, v in zip(oof, val_parts, strict=True)],
                                        np.concatenate([y_train, y_val]))
            fitted_on = f"out-of-fold predictions of {folds} folds of the training set + the validation set"
        else:
            weights, fitted_on = val_only, f"the validation set ({why_not})"
        ngrams.weights, ngrams.rule = weights.astype(np.float32), self.blend
        self.ngrams_ = ngrams
        blend = ngrams.combine(val_probs, *val_parts[1:])
        named = dict(zip(("language_model", *members), val_parts, strict=True))
        accuracy = {name: float((p.argmax(axis=1) == np.asarray(y_val)).mean()) if len(y_val) else float("nan")
                    for name, p in {**named, "blend": blend}.items()}
        self.ensemble_report_ = {"members": list(named), "weights": [float(w) for w in weights],
                                 "fitted_on": fitted_on, "weights_validation_only": [float(w) for w in val_only],
                                 "validation_accuracy": accuracy, "seconds": round(time.perf_counter() - start, 2)}
        if self.encoder_ is not None:
            self.ensemble_report_["encoder"] = {"name": encoder_name, "c": c}
        log.info("ensemble fitted in %.1f s on %s: weights %s (validation set alone: %s); validation accuracy %s",
                 self.ensemble_report_["seconds"], fitted_on,
                 ", ".join(f"{n} {w:.3f}" for n, w in zip(named, weights, strict=True)),
                 ", ".join(f"{w:.3f}" for w in val_only), ", ".join(f"{n} {a:.4f}" for n, a in accuracy.items()))
        return blend

    def _why_no_refit(self) -> str:
        """Why this classifier's head cannot be refit on folds cheaply (logged with the weights)."""
        return f"the {self.engine} engine does not refit its model on folds"

    def _blend_scores(self, texts: list[str]) -> list[np.ndarray] | None:
        """The blend members' class log-probabilities of `texts` (n-grams, then any sentence encoder's),
        or None without a blend."""
        if getattr(self, "ngrams_", None) is None:
            return None
        encoder = getattr(self, "encoder_", None)
        return [self.ngrams_.scores(texts), *([] if encoder is None else [encoder.scores(texts)])]

    def _with_ngrams(self, probs: np.ndarray, texts: list[str], scores: list[np.ndarray] | None = None) -> np.ndarray:
        """The language model's probabilities, combined with the blend's members' if there is a blend
        (`scores`: their `_blend_scores(texts)`, when computed already)."""
        if getattr(self, "ngrams_", None) is None:
            return probs
        return self.ngrams_.combine(probs, *(self._blend_scores(texts) if scores is None else scores))

    def _save_blend(self, out_dir: Path) -> None:
        """The blend's files: ngrams.safetensors (with the weights), and encoder.safetensors if it has one."""
        if getattr(self, "ngrams_", None) is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.ngrams_.save(out_dir)
            if getattr(self, "encoder_", None) is not None:
                self.encoder_.save(out_dir)

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

    @property
    def label_thresholds(self) -> LabelThresholds | None:
        """A multi-label model's per-label thresholds and separator (`llmclf.multilabel`); None: one label per text."""
        return getattr(self, "label_thresholds_", None)

    def _label_sets(self, data: LabelledTexts) -> list[list[str]]:
        """Each text's label names: split by the data's separator, else by the multi-label model's."""
        from llmclf.multilabel import split_labels

        sep = data.label_sep or (self.label_thresholds.sep if self.label_thresholds is not None else None)
        if sep is None:
            return [[label] for label in data.labels]
        return [split_labels(label, sep, data.source).split(sep) for label in data.labels]

    def _label_names(self, data: LabelledTexts) -> list[str]:
        return [name for names in self._label_sets(data) for name in names]

    def _check_multi_label_options(self) -> None:
        """Multi-label training: refuse the options that have no per-label meaning; say what is off."""
        for name in ("tune_threshold", "positive_label"):
            if getattr(self, name) is not None:
                raise ConfigError(f"{TrainArgs.flag(name)} is for one binary decision; a multi-label model tunes a "
                                  "threshold per label on the validation set: leave it out")
        if getattr(self, "long_text", long_text.TRUNCATE) != long_text.TRUNCATE:
            raise ConfigError(f"{TrainArgs.flag('long_text')} {self.long_text} aggregates windows' softmax "
                              "log-probabilities, which a multi-label model (one sigmoid per label) does not have: "
                              "leave --long-text out (texts are cut to --max-length) or train one label per text")
        off = [f"{TrainArgs.flag(n)} {getattr(self, n)}" for n in ("ensemble", "calibration")
               if getattr(self, n, "none") != "none"]
        if off:
            log.info("multi-label: %s off (one sigmoid per label; per-label thresholds instead)", ", ".join(off))

    def _label_ids(self, data: LabelledTexts) -> list[int] | list[list[int]]:
        """Class ids of `data`'s labels; for a multi-label model, a 0/1 row per text (one column per label)."""
        index = {label: i for i, label in enumerate(self.classes_)}
        if self.label_thresholds is not None:
            from llmclf.multilabel import multi_hot

            sets = self._label_sets(data)
            unknown = sorted({name for names in sets for name in names} - set(index), key=str)
            if unknown:
                raise DataError(f"{data.source}: labels {unknown} are not among the model's {self.classes_}")
            return multi_hot(sets, self.classes_).tolist()
        unknown = sorted(set(data.labels) - set(index))
        if unknown:
            raise DataError(f"{data.source}: labels {unknown} are not among the model's {self.classes_}")
        return [index[label] for label in data.labels]

    def _activate(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities from the head's logits: softmax over classes, or one sigmoid per label (multi-label)."""
        return torch.sigmoid(logits.float()) if self.label_thresholds is not None else torch.softmax(logits, dim=-1)

    def _calibrated(self, probs: np.ndarray) -> np.ndarray:
        """The whole classifier's probabilities rescaled by its temperature (1 when not calibrated)."""
        return apply_temperature(probs, getattr(self, "temperature_", 1.0))

    def predict_proba(self, texts: Sequence[str] | str, batch_size: int = 32) -> np.ndarray:
        """Class probabilities (N, len(classes_)), columns in `classes_` order, rows in input order;
        one deterministic pass (dropout off), calibrated (the temperature fitted on validation)."""
        self._check_fitted()
        texts = self._as_texts(texts)
        if not texts:
            return np.zeros((0, len(self.classes_)), dtype=np.float32)
        return self._calibrated(self._with_ngrams(self._text_probabilities(texts, batch_size, dropout=False), texts))

    def predict(self, texts: Sequence[str] | str, batch_size: int = 32) -> list[str]:
        """Predicted label names, in input order (by the decision threshold of a binary model that has one;
        a multi-label model's: each text's labels joined by its separator)."""
        if self.label_thresholds is not None:
            return self.label_thresholds.names(self.predict_proba(texts, batch_size), self.classes_)
        return [self.classes_[i] for i in decide(self.predict_proba(texts, batch_size), self.decision)]

    def explain(self, texts: Sequence[str] | str, method: str = "auto", steps: int = DEFAULT_STEPS,
                batch_size: int = 32) -> list[Explanation]:
        """Per-token attributions of each text for its predicted label (`llmclf.explain.explain`):
        integrated gradients on the token embeddings, or occlusion (`method`; auto: occlusion for ONNX)."""
        return explain(self, texts, method=method, steps=steps, batch_size=batch_size)

    @property
    def decision(self) -> DecisionThreshold | None:
        """The binary decision threshold (tuned on validation, or set), or None: the most probable label."""
        return getattr(self, "decision_", None)

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
        if self.label_thresholds is not None:
            raise ConfigError("MC-dropout is for single-label models; this one is multi-label (one probability "
                              "per label, each against its threshold)")
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
            return MCDropoutResult([], empty, empty.copy(), [], list(self.classes_), passes, threshold, self.decision)
        if seed is not None:
            torch.manual_seed(seed)
        scores = self._blend_scores(texts)
        with dropout_active(self._torch_module(), dropout_rate):
            runs = np.stack([self._calibrated(self._with_ngrams(
                self._text_probabilities(texts, batch_size, dropout=True), texts, scores)) for _ in range(passes)])
        mean, std = runs.mean(axis=0), runs.std(axis=0)
        best = decide(mean, self.decision)
        confident = [threshold is None or bool(mean[i, best[i]] >= threshold) for i in range(len(texts))]
        labels = [self.classes_[int(i)] for i in best]
        return MCDropoutResult(labels, mean, std, confident, list(self.classes_), passes, threshold, self.decision)

    def evaluate(self, data: LabelledTexts, batch_size: int = 32) -> dict:
        """Accuracy, per-class precision/recall/F1, macro-F1, confusion matrix, loss and n, and the
        calibration: `log_loss` (= `loss`), `brier`, `ece` and the `reliability` bins (see `_metrics`)."""
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
        """`classification_metrics` of the decided labels, plus `log_loss`, `brier` (mean over texts of
        the sum over classes of the squared error), `ece` (top-label, 15 equal-width confidence bins) and
        `reliability` (per bin: texts, mean confidence, accuracy; what calibration.png shows). A multi-label
        model's: `llmclf.multilabel.multilabel_metrics`."""
        if self.label_thresholds is not None:
            return multilabel_metrics(np.asarray(y_true, dtype=np.int64).reshape(len(y_true), len(self.classes_)),
                                      probs, self.classes_, self.label_thresholds.thresholds)
        y_pred = decide(probs, self.decision).tolist()
        scores = calibration_scores(probs, y_true)
        metrics = classification_metrics(y_true, y_pred, self.classes_, scores["log_loss"] if y_true else float("nan"))
        count, confidence, accuracy = reliability_bins(probs, y_true)
        as_list = lambda a: [None if np.isnan(v) else float(v) for v in a]  # noqa: E731 (JSON has no NaN)
        metrics.update(scores, reliability={"bins": len(count), "count": count.tolist(),
                                            "confidence": as_list(confidence), "accuracy": as_list(accuracy)})
        if self.decision is not None:
            metrics["decision_threshold"] = {"label": self.classes_[self.decision.positive],
                                             "threshold": self.decision.threshold}
        return metrics

    def info(self) -> dict[str, Any]:
        """What serving and users need to know: labels, backbone, engine, max_length, metrics."""
        self._check_fitted()
        config = getattr(self, "config_", {}) or {}
        metrics = config.get("metrics")
        if metrics is None and hasattr(self, "val_metrics_"):  # fitted in this process, not loaded
            metrics = {"validation": self.val_metrics_, "train_seconds": getattr(self, "train_seconds_", None)}
        return {"labels": list(self.classes_), "backbone": str(config.get("backbone", getattr(self, "model", ""))),
                "engine": self.engine, "max_length": self.max_length_, "metrics": metrics,
                "test_metrics": config.get("test_metrics"), **self.fitted_config(),
                "long_text": getattr(self, "long_text_", long_text.TRUNCATE),
                "aggregate": getattr(self, "aggregate_", None)}


def evaluation_report(clf: BaseClassifier, data: LabelledTexts, plots_dir: str | os.PathLike | None = None) -> dict:
    """`clf.evaluate(data)`, plus the confusion matrix and the reliability diagram as PNG in `plots_dir`
    (confusion_matrix.png, calibration.png)."""
    metrics = clf.evaluate(data)
    if plots_dir is not None and metrics.get("multi_label"):  # no confusion matrix: a bar chart per label
        plot_per_label(metrics, Path(plots_dir) / "per_label.png")
        plot_calibration(metrics["reliability"], Path(plots_dir) / "calibration.png",
                         title=f"ECE {metrics['ece']:.4f} (each label's decision, "
                               f"{metrics['reliability']['bins']} bins)")
    elif plots_dir is not None:
        plot_confusion_matrix(metrics["confusion_matrix"], metrics["labels"], Path(plots_dir) / "confusion_matrix.png")
        plot_calibration(metrics["reliability"], Path(plots_dir) / "calibration.png",
                         title=f"ECE {metrics['ece']:.4f} (top label, {metrics['reliability']['bins']} bins)")
    return metrics
