"""The Transformers engine: encoder models (BERT family) fine-tuned with `transformers.Trainer`.

The course's Hugging Face path as a first-class engine: `AutoModelForSequenceClassification`,
tokenization with truncation and dynamic padding, and `Trainer` for the loop, driven by the same
`TrainArgs` and the same shared parts as the from-scratch engine (`llmclf.training.optim`): AdamW
parameter groups, learning-rate schedule, (weighted) loss, best evaluation by `select_by` (ties
to the lower validation loss), early stopping. While it trains, Trainer's full checkpoints
(weights, optimizer, scheduler, RNG states) go to `OUT/checkpoints/`, each marked complete once
written, so that `resume=True` continues a killed run exactly. The trained model is saved with
`save_pretrained` in `hf_model/`, beside the same `config.json`, metrics log, history and plots
as the from-scratch engine.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from llmclf import distributed
from llmclf.data.classification import LabelledTexts, inference_batches
from llmclf.engines.base import HISTORY_FILE, METRICS_LOG_FILE, BaseClassifier
from llmclf.errors import CheckpointError, ConfigError
from llmclf.loaders.checkpoint import CHECKPOINT_FORMAT, CONFIG_FILE, read_checkpoint_config
from llmclf.loaders.encoders import from_pretrained, length_limits, resolve_hf_model
from llmclf.loaders.paths import model_file
from llmclf.loaders.tensors import atomic_files, atomic_write_json, write_error
from llmclf.runtime import inference_autocast, resolve_device, resolve_precision
from llmclf.tracking import NoTracker, Tracker, track_final, trainer_metric_names
from llmclf.training.args import TrainArgs
from llmclf.training.metrics import classification_scores
from llmclf.training.optim import (
    Selection,
    class_weight_tensor,
    classification_loss,
    make_optimizer,
    metric_value,
    warmup_steps,
)
from llmclf.training.plots import plot_series
from llmclf.training.state import (
    STATE_DIR,
    StopRequest,
    TrainingInterruptedError,
    fault_point,
    start_run,
    stop_requests,
)

log = logging.getLogger(__name__)

HF_MODEL_DIR = "hf_model"
# --lr-schedule -> Trainer's lr_scheduler_type (the same factors as `optim.lr_factor`)
LR_SCHEDULER_TYPES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}
CHECKPOINT_PREFIX = "checkpoint-"  # Trainer's checkpoint directories: checkpoint-STEP
COMPLETE_MARKER = "llmclf-complete.json"  # written (atomically) once Trainer has written a whole checkpoint
KEEP_CHECKPOINTS = 2  # the newest complete checkpoints kept, besides the best one


def load_sequence_classifier(source: str, labels: list[str] | None = None, dtype: torch.dtype | None = None):
    """(model, tokenizer) from a Hugging Face directory or hub id, checked for use as a classifier:
    a sequence-classification model type, a tokenizer that fits the embeddings, and (for a
    checkpoint that already has a classification head) the same number of labels."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    if Path(source).is_dir():
        if not (Path(source) / "config.json").is_file():
            raise CheckpointError(f"{source} has no config.json; expected a Hugging Face model directory "
                                  "(config.json, weights, tokenizer files), e.g. written by save_pretrained")
        for file in Path(source).iterdir():  # from_pretrained would follow a link out of the directory
            model_file(source, file.name)
    config = from_pretrained(AutoConfig, source, "model config")
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
            "classification; choose an encoder such as BERT/MiniLM (or a decoder of a registered family with the "
            "scratch engine)") from None
    model = from_pretrained(AutoModelForSequenceClassification, source, "sequence-classification model",
                             config=config, **({"dtype": dtype} if dtype is not None else {}))
    tokenizer = from_pretrained(AutoTokenizer, source, "tokenizer")
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


def _compute_metrics(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred
    return classification_scores(logits[0] if isinstance(logits, tuple) else logits, labels)


def steps_per_epoch(n_train: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps per epoch, as Trainer counts them (a shorter last accumulation counts)."""
    return max(1, math.ceil(math.ceil(n_train / batch_size) / grad_accum))


# --- checkpoints ------------------------------------------------------------------------------

def _checkpoint_dirs(state_dir: Path) -> list[Path]:
    """Trainer's `checkpoint-STEP` directories in `state_dir`, oldest step first."""
    found = []
    for path in Path(state_dir).glob(f"{CHECKPOINT_PREFIX}*"):
        step = path.name[len(CHECKPOINT_PREFIX):]
        if step.isdigit() and path.is_dir():
            found.append((int(step), path))
    return [path for _, path in sorted(found)]


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name[len(CHECKPOINT_PREFIX):])


def _is_complete(checkpoint: Path) -> bool:
    return (checkpoint / COMPLETE_MARKER).is_file()


def resume_checkpoint(state_dir: Path) -> Path | None:
    """The newest checkpoint marked complete (None: start from the beginning). Checkpoints without
    the mark, which a process killed while Trainer was writing them leaves, are removed."""
    checkpoints = _checkpoint_dirs(state_dir)
    complete = [c for c in checkpoints if _is_complete(c)]
    chosen = complete[-1] if complete else None
    for checkpoint in checkpoints:
        if _is_complete(checkpoint):
            continue
        if chosen is None or _step(checkpoint) > _step(chosen):
            log.warning("checkpoint %s is incomplete (the run stopped while writing it); %s", checkpoint,
                        f"resuming from {chosen.name}, the previous complete one" if chosen else
                        "there is no complete one before it")
        shutil.rmtree(checkpoint, ignore_errors=True)
    if chosen is None:
        log.info("no complete checkpoint in %s yet; starting the run from the beginning", state_dir)
    else:
        log.info("resuming from %s", chosen)
    return chosen


def _rotate_checkpoints(state_dir: Path, best: str | None) -> None:
    """Keep the newest `KEEP_CHECKPOINTS` complete checkpoints and the best one."""
    complete = [c for c in _checkpoint_dirs(state_dir) if _is_complete(c)]
    keep = {c.name for c in complete[-KEEP_CHECKPOINTS:]} | ({Path(best).name} if best else set())
    for checkpoint in complete:
        if checkpoint.name not in keep:
            (checkpoint / COMPLETE_MARKER).unlink(missing_ok=True)  # never half-deleted yet marked complete
            shutil.rmtree(checkpoint, ignore_errors=True)


def _load_checkpoint_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    """The weights of Trainer checkpoint `checkpoint` into `model` (as Trainer's best-model loading)."""
    from safetensors.torch import load_file

    weights = checkpoint / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing: the checkpoint of the best evaluation was removed")
    result = model.load_state_dict(load_file(weights, device="cpu"), strict=False)
    if result.unexpected_keys:
        raise CheckpointError(f"{weights} does not fit the model: unexpected {result.unexpected_keys}")
    if result.missing_keys:  # tied weights are saved once
        log.warning("%s has no %s; kept the model's own", weights, ", ".join(result.missing_keys))


def _eval_record(metrics: dict[str, float], step: int, epoch: float | None) -> dict[str, Any]:
    """One validation evaluation as `optim.Selection` takes it, from Trainer's `eval_*` metrics."""
    return {"accuracy": metrics["eval_accuracy"], "macro_f1": metrics["eval_macro_f1"], "loss": metrics["eval_loss"],
            "step": step, "epoch": round(epoch or 0.0, 4)}


@functools.cache
def _trainer_classes() -> tuple[type, type]:
    """(SelectionCallback, ClassifierTrainer), defined on first use: transformers loads only then."""
    from transformers import Trainer, TrainerCallback

    class SelectionCallback(TrainerCallback):
        """What llmclf decides in Trainer's loop: the best evaluation by `select_by` (ties to the
        lower loss, `optim.Selection`, the scratch engine's), early stopping after `patience`
        evaluations without a better one, when a checkpoint is written (after every epoch,
        every `save_every` steps, and at every new best, whose weights are kept at the end),
        the mark that a checkpoint is complete, which checkpoints stay, and the metrics log."""

        def __init__(self, args: TrainArgs, metrics_log: IO[str] | None = None) -> None:
            self.args, self.metrics_log = args, metrics_log
            self.selection = Selection(args.select_by)
            self.stopped_early = False
            self.saved_step: int | None = None
            self.signalled = StopRequest()  # set by `fit` to the one SIGINT/SIGTERM fill in
            self.stopping = False  # a signal came: stop once the next checkpoint is written
            self.open_tracker: Callable[[int], Tracker] = lambda step: NoTracker()  # set by `fit` (--report-to)
            self.tracker: Tracker = NoTracker()

        def _write(self, record: dict[str, Any], track: bool = True) -> None:
            if track:
                self.tracker.log_metrics(trainer_metric_names(record), record["step"])
            if self.metrics_log is not None:
                try:
                    self.metrics_log.write(json.dumps(record) + "\n")
                    self.metrics_log.flush()
                except OSError as exc:  # e.g. the disk is full: say which file
                    raise write_error(exc, self.metrics_log.name, any_file=True) from exc

        def on_train_begin(self, args, state, control, **kwargs):
            # Resuming, `state` is the checkpoint's: its evaluations rebuild the selection (and the
            # patience count), its log replaces whatever the killed process logged after it.
            self.selection = Selection(self.args.select_by)
            for record in state.log_history:
                if "eval_loss" in record:
                    self.selection.update(_eval_record(record, record["step"], record.get("epoch")))
            self.saved_step = state.global_step or None
            self.tracker = self.open_tracker(state.global_step)  # (a resumed tracker holds the replayed records)
            if self.metrics_log is not None:
                self.metrics_log.seek(0)
                self.metrics_log.truncate()
                for record in state.log_history:
                    self._write({"step": record["step"], "epoch": record.get("epoch"), **record}, track=False)

        def on_step_end(self, args, state, control, **kwargs):
            # After Trainer counted optimizer step N, before its log, evaluation and checkpoint:
            # a kill here loses step N unless a checkpoint of it was written before.
            fault_point("step", state.global_step)
            every, per_epoch = self.args.save_every, state.max_steps // max(1, state.num_train_epochs)
            if every and state.global_step % every == 0 and state.global_step % per_epoch:
                control.should_save = True  # (the end of an epoch saves anyway)
            if self.signalled.signum is not None and state.global_step < state.max_steps:
                self.stopping = True  # on_save stops once this step's checkpoint (or its epoch's) is written
                control.should_save = control.should_save or bool(state.global_step % per_epoch)

        def on_epoch_end(self, args, state, control, **kwargs):
            if not self.stopped_early and self.saved_step != state.global_step:
                control.should_save = True

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            record = _eval_record(metrics, state.global_step, state.epoch)
            select_by = self.args.select_by
            if self.selection.update(record):
                state.best_global_step = state.global_step
                state.best_metric = metric_value(record, select_by)
                state.best_model_checkpoint = os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}{state.global_step}")
                control.should_save = True  # its weights must be on disk (rotation keeps them)
            best = self.selection.best
            log.info("validation: accuracy %.2f%%, macro-F1 %.4f, loss %.4f (step %d; best by %s: step %d)",
                     record["accuracy"] * 100, record["macro_f1"], record["loss"], state.global_step, select_by,
                     best["step"])
            if self.selection.should_stop(self.args.patience):
                self.stopped_early = True
                control.should_training_stop = True
                control.should_save = False  # a resumed run replays to here and stops the same way
                log.info("early stop: no better validation %s in %d evaluation(s)", select_by, self.args.patience)

        def on_save(self, args, state, control, **kwargs):
            checkpoint = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
            fault_point("save", state.global_step)  # written, not yet marked complete
            self.saved_step = state.global_step
            if state.is_world_process_zero:  # (rank 0 wrote the checkpoint; it alone marks and rotates)
                atomic_write_json(checkpoint / COMPLETE_MARKER, {"step": state.global_step, "epoch": state.epoch})
                _rotate_checkpoints(Path(args.output_dir), state.best_model_checkpoint)
            if self.stopping:
                raise TrainingInterruptedError(
                    f"training stopped by {signal.Signals(self.signalled.signum).name} after optimizer step "
                    f"{state.global_step} of {state.max_steps}; its state is saved in {checkpoint}: continue the "
                    "run with --resume", self.signalled.signum)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:  # keys sorted, as in the checkpoints' trainer_state.json that a resumed run rewrites it from
                self._write({"step": state.global_step, "epoch": state.epoch, **dict(sorted(logs.items()))})

    class ClassifierTrainer(Trainer):
        """Trainer with llmclf's AdamW parameter groups (`optim.make_optimizer`: no decay on biases,
        norm weights and embeddings) and loss (`optim.classification_loss`, weighted in training)."""

        # compute_loss returns the mean over its batch: Trainer divides it by the accumulation steps
        loss_is_scaled_for_ga = False

        def __init__(self, *args: Any, class_weights: torch.Tensor | None = None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.class_weights = class_weights
            self.model_accepts_loss_kwargs = False  # the labels never reach the model

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                self.optimizer = make_optimizer(self.model if model is None else model, self.args.learning_rate,
                                                self.args.weight_decay)
            return self.optimizer

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = dict(inputs)
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            # Validation loss is unweighted, as the scratch engine's (and comparable across weightings).
            loss = classification_loss(outputs.logits, labels, self.class_weights if model.training else None)
            return (loss, outputs) if return_outputs else loss

    return SelectionCallback, ClassifierTrainer


def selection_callback(args: TrainArgs, metrics_log: IO[str] | None = None):
    """The `TrainerCallback` that selects, stops early, saves and logs for `HFClassifier.fit`."""
    return _trainer_classes()[0](args, metrics_log)


class HFClassifier(BaseClassifier):
    """An encoder (BERT family) fine-tuned with `transformers.Trainer`.

    Parameters are stored as given (scikit-learn style) and checked in `fit`. Learned state ends
    in `_`: `classes_`, `model_`, `tokenizer_`, `max_length_`, `history_`.

    Args:
        model: a Hugging Face directory, `all-minilm-l6-v2` (packaged) or a hub id.
        **options: the training options of `llmclf.training.args.TrainArgs` (listed below with
            their defaults for this engine). `template` is e.g. the "query: {text}" prefix E5
            models expect; `max_length` defaults to the longest training text, capped at the
            model's limit (256 for all-MiniLM-L6-v2, its sentence-transformers `max_seq_length`).
    """

    engine = "hf"

    def __init__(self, model: str = "all-minilm-l6-v2", **params: Any) -> None:
        super().__init__(model, **params)

    def training_arguments(self, output_dir: str | os.PathLike, n_train: int, progress: bool = True,
                           args: TrainArgs | None = None):
        """The `TrainingArguments` this classifier trains with, from its `TrainArgs` (`args`, else its
        own): public so that a plain Trainer script can use the same settings. Checkpoints (when,
        which kept) and the best model are left to `fit`'s callback: `save_strategy="no"`."""
        from transformers import TrainingArguments

        args = args or self.train_args()
        device = resolve_device(args.device)
        total_steps = steps_per_epoch(n_train, args.batch_size, args.grad_accum) * args.epochs
        return TrainingArguments(
            output_dir=str(output_dir),
            num_train_epochs=args.epochs,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=args.eval_batch_size or args.batch_size,
            learning_rate=args.lr,
            lr_scheduler_type=LR_SCHEDULER_TYPES[args.lr_schedule],
            warmup_steps=warmup_steps(total_steps, args.warmup),
            weight_decay=args.weight_decay,
            max_grad_norm=args.max_grad_norm,
            gradient_accumulation_steps=args.grad_accum,
            eval_strategy="steps" if args.eval_freq else "epoch",
            eval_steps=args.eval_freq,
            save_strategy="no",
            save_only_model=False,
            load_best_model_at_end=False,
            logging_strategy="steps",
            logging_steps=args.log_every,
            seed=args.seed,
            bf16=resolve_precision(args.precision, device) == torch.bfloat16,
            use_cpu=device.type == "cpu",
            report_to="none",  # --report-to is llmclf.tracking's: the same keys and resume in both engines
            disable_tqdm=not progress,
            dataloader_num_workers=0,
        )

    def fit(self, train: LabelledTexts, val: LabelledTexts, out_dir: str | os.PathLike | None = None,
            progress: bool = True, resume: bool = False) -> HFClassifier:
        """Fine-tune on `train` with `Trainer`, keeping the weights of the best `val` evaluation (by
        `select_by`).

        With `out_dir`: Trainer checkpoints in `out_dir/checkpoints/` while it runs (`resume=True`
        continues an interrupted run from the newest complete one, exactly), then the model, the
        metrics log (`metrics.jsonl`), history and plots. Returns self."""
        args = self.train_args()
        distributed.init(args.device)  # under torchrun: joined here; Trainer (accelerate) uses this group
        main = distributed.is_main()
        progress = progress and main
        self._learn_classes(train, val)
        resuming = self._prepare_run(args, train, val, out_dir, resume)
        if resuming is None:
            return self
        from transformers import DataCollatorWithPadding, PrinterCallback, set_seed

        start = time.perf_counter()
        source = resolve_hf_model(self.model)
        set_seed(args.seed)  # the new head's initialisation
        model, self.tokenizer_ = load_sequence_classifier(source, self.classes_)
        if self.label_thresholds is not None:  # one sigmoid per label, as Transformers' pipelines read it
            model.config.problem_type = "multi_label_classification"
        hard_limit, trained_limit = length_limits(source, model, self.tokenizer_)
        if args.max_length:
            self.max_length_ = min(args.max_length, hard_limit)
        else:
            train_enc = self.tokenizer_(self._model_inputs(train.texts), truncation=False, verbose=False)
            self.max_length_ = min(max(len(ids) for ids in train_enc["input_ids"]), trained_limit)
        # --long-text chunk: every window a training example with its text's label
        windows = self._long_text_windows(args, train, val, trained_limit, hard_limit)
        (train_w, _), (val_w, _) = windows or ((train, None), (val, None))
        train_set = self._dataset(train_w, "training")
        val_set = self._dataset(val_w, "validation")
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("%s: %s parameters, all trainable; max_length %d", source, f"{n_trainable:,}", self.max_length_)
        class_weights = class_weight_tensor(args.class_weights, train_set.labels, len(self.classes_))
        if class_weights is not None:
            named = zip(self.classes_, class_weights.tolist(), strict=True)
            log.info("class weights: %s", ", ".join(f"{c} {w:.3f}" for c, w in named))

        # One directory for all ranks: rank 0 creates it (or a temporary one) and names it to the others.
        work_dir = None
        if out_dir is None:
            work_dir = distributed.broadcast(tempfile.mkdtemp(prefix="llmclf-trainer-") if main else None)
        state_dir = Path(work_dir) if work_dir else Path(out_dir) / STATE_DIR
        if out_dir is not None and main:
            start_run(out_dir, self.run_)
        checkpoint = distributed.broadcast(resume_checkpoint(state_dir) if resuming and main else None)
        metrics_log = open(Path(out_dir) / METRICS_LOG_FILE, "w", encoding="utf-8") if out_dir and main else None  # noqa: SIM115
        selector = selection_callback(args, metrics_log)
        n_parameters = sum(p.numel() for p in model.parameters())
        selector.open_tracker = lambda step: self._open_tracker(args, out_dir, bool(resuming), step, train, val,
                                                                n_parameters, n_trainable)
        try:
            trainer = _trainer_classes()[1](
                model=model, args=self.training_arguments(state_dir, len(train_set), progress, args),
                train_dataset=train_set, eval_dataset=val_set, data_collator=DataCollatorWithPadding(self.tokenizer_),
                processing_class=self.tokenizer_, compute_metrics=_compute_metrics, callbacks=[selector],
                class_weights=class_weights)
            trainer.remove_callback(PrinterCallback)  # without progress bars: logs go to the log, not stdout
            # SIGINT/SIGTERM: a checkpoint at the next step, then TrainingInterruptedError (one process: see
            # ClassifierTraining.run). A checkpoint Trainer could not write is never marked complete.
            with stop_requests(out_dir is not None and distributed.world_size() == 1) as selector.signalled:
                try:
                    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
                except Exception as exc:
                    error = write_error(exc, state_dir / f"{CHECKPOINT_PREFIX}{trainer.state.global_step}")
                    if error is None or error is exc:
                        raise
                    raise error from exc
            state, best = trainer.state, selector.selection.best
            distributed.barrier()  # rank 0 has written every checkpoint
            if best is not None and best["step"] != state.global_step:
                _load_checkpoint_weights(trainer.model, Path(state_dir) / f"{CHECKPOINT_PREFIX}{best['step']}")
                log.info("restored the weights of step %d (epoch %g; validation %s %.4f)", best["step"],
                         best["epoch"], args.select_by, metric_value(best, args.select_by))
            self.history_ = {"log_history": state.log_history, "select_by": args.select_by, "best": best,
                             "best_step": best["step"] if best else None,
                             "best_metric": metric_value(best, args.select_by) if best else None,
                             "evaluations": selector.selection.history, "stopped_early": selector.stopped_early,
                             "global_step": state.global_step}
        except BaseException:
            selector.tracker.close()
            raise
        finally:
            if metrics_log is not None:
                with contextlib.suppress(OSError):  # a write that failed (disk full) was reported already
                    metrics_log.close()
            if work_dir is not None and main:
                shutil.rmtree(work_dir, ignore_errors=True)
        self.model_ = trainer.model.eval()
        self.train_seconds_ = time.perf_counter() - start
        self.n_trainable_ = n_trainable
        self.config_ = {"backbone": str(self.model)}
        val_probs = self._text_probabilities(val.texts, args.eval_batch_size or 32, dropout=False)
        self.val_metrics_ = self._finish_fit(train, val, val_probs, progress=progress)
        self.last_step_ = self.history_["global_step"]
        track_final(selector.tracker, {"validation": self.val_metrics_}, self.last_step_)
        if out_dir is not None and main:
            self._save_finished_run(out_dir, state_dir)
        distributed.barrier()
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
                     "Validation macro-F1": [(r["step"], r["eval_macro_f1"]) for r in evals]},
                    out_dir / "accuracy.png", xlabel="Optimizer steps", ylabel="Score")

    # --- inference --------------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            super()._check_fitted()

    def _torch_module(self) -> torch.nn.Module:
        return self.model_

    def _explain_access(self):
        from llmclf.explain import ModelAccess

        self.model_.eval()
        pad_id = self.tokenizer_.pad_token_id if self.tokenizer_.pad_token_id is not None else 0
        return ModelAccess(lambda ids, mask: self.model_(input_ids=ids, attention_mask=mask).logits,
                           self.model_.get_input_embeddings(), next(self.model_.parameters()).device, pad_id)

    @torch.no_grad()
    def _probabilities(self, texts: list[str], batch_size: int, dropout: bool) -> np.ndarray:
        if not dropout:
            self.model_.eval()
        device = next(self.model_.parameters()).device
        dtype = resolve_precision(self.precision, device)
        texts = self._model_inputs(texts)
        encoded = self.tokenizer_(texts, truncation=True, max_length=self.max_length_)["input_ids"]
        out = np.empty((len(texts), len(self.classes_)), dtype=np.float32)
        for idx in inference_batches([len(ids) for ids in encoded], batch_size):
            batch = self.tokenizer_([texts[i] for i in idx], truncation=True, max_length=self.max_length_,
                                    padding=True, return_tensors="pt").to(device)
            with inference_autocast(self.model_, device, dtype):
                logits = self.model_(**batch).logits
            out[idx] = self._activate(logits.float()).cpu().numpy()
        return out

    # --- persistence ------------------------------------------------------------------------

    def save(self, out_dir: str | os.PathLike) -> Path:
        """`save_pretrained` files (model + tokenizer) in `hf_model/`, and llmclf's config.json
        (labels, max_length, training options, the run's fingerprint, metrics) and history beside them.

        Everything is written to a staging directory first, then moved in (config.json last): a save that
        fails (disk full, permission denied: WriteError) leaves the previous model in `out_dir` whole.
        """
        self._check_fitted()
        out_dir = Path(out_dir)
        config = {
            "format": CHECKPOINT_FORMAT, "format_version": 1, "task": "classification", "engine": self.engine,
            "architecture": self.model_.config.model_type, "hf_model": HF_MODEL_DIR, "backbone": str(self.model),
            "labels": self.classes_, "max_length": self.max_length_, "training": self.training_options(),
            "input_template": self.template_, "run": getattr(self, "run_", None), **self.fitted_config(),
            "metrics": self._saved_metrics()}
        history = getattr(self, "history_", None)
        with atomic_files(out_dir, last=CONFIG_FILE) as staging:
            self.model_.save_pretrained(staging / HF_MODEL_DIR)
            self.tokenizer_.save_pretrained(staging / HF_MODEL_DIR)
            self._save_blend(staging)
            if history is not None:
                atomic_write_json(staging / HISTORY_FILE, history)
            atomic_write_json(staging / CONFIG_FILE, config)
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
        clf = cls(str(config.get("backbone", path)),
                  **{**cls._saved_params(config), "precision": precision, "device": device})
        clf.classes_ = list(labels)
        clf.tokenizer_ = tokenizer
        hard_limit, _ = length_limits(str(model_dir), model, tokenizer)
        clf.max_length_ = min(max_length or config.get("max_length") or hard_limit, hard_limit)
        clf.model_ = model.to(resolve_device(device)).eval()
        clf.config_ = config
        clf._restore_fitted(config, path)
        return clf


HFClassifier.__doc__ += TrainArgs.docs("hf")
