"""The from-scratch engine: `TextClassifier` fine-tunes llmclf's own models (any registered family),
scikit-learn style: new head, chosen trainable layers, cached frozen layers, mixed precision."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmclf import distributed, long_text
from llmclf.config import DEFAULT_BACKBONE
from llmclf.data.classification import (
    EncodedTexts,
    LabelledTexts,
    encode_texts,
    inference_batches,
    template_prefix_tokens,
    template_suffix_tokens,
)
from llmclf.engines.base import HISTORY_FILE, METRICS_LOG_FILE, BaseClassifier, NotFittedError
from llmclf.errors import ConfigError
from llmclf.loaders.checkpoint import CONFIG_FILE, read_checkpoint_config, save_checkpoint
from llmclf.loaders.spec import load_model
from llmclf.loaders.tensors import atomic_files, atomic_write_json
from llmclf.models.heads import SequenceClassifier, Trainable, apply_trainable, merge_lora, replace_head
from llmclf.runtime import resolve_device, resolve_precision
from llmclf.tracking import NoTracker, track_final
from llmclf.training.args import TrainArgs
from llmclf.training.classifier import Batches, ClassifierTraining, all_logits, iter_logits
from llmclf.training.optim import class_weight_tensor
from llmclf.training.plots import plot_values
from llmclf.training.state import load_training_state, start_run

log = logging.getLogger(__name__)

__all__ = ["NotFittedError", "TextClassifier"]


class TextClassifier(BaseClassifier):
    """A language model (llmclf's own, of a registered family) with a class head, trained on labelled texts.

    Parameters are stored as given (scikit-learn style) and checked in `fit`. Learned state ends
    in `_`: `classes_` (label names, the column order of `predict_proba`), `model_`,
    `tokenizer_`, `max_length_`, `history_`.

    Args:
        model: backbone spec (see `llmclf.load_model`).
        model_options: passed to `load_model` (random_init, seed, base_config, context_length,
            drop_rate, qkv_bias, tokenizer_dir).
        **options: the training options of `llmclf.training.args.TrainArgs` (listed below with
            their defaults for this engine).
    """

    engine = "scratch"
    extra_params = ("model_options",)

    def __init__(self, model: str = DEFAULT_BACKBONE, **params: Any) -> None:
        super().__init__(model, **params)

    # --- training ---------------------------------------------------------------------------

    def fit(self, train: LabelledTexts, val: LabelledTexts, out_dir: str | os.PathLike | None = None,
            progress: bool = True, resume: bool = False) -> TextClassifier:
        """Fine-tune on `train`, keeping the weights of the best `val` evaluation (by `select_by`).

        With `out_dir`: training states in `out_dir/checkpoints/` while it runs (`resume=True`
        continues an interrupted run from the newest one, exactly), then the model, the metrics log
        (`metrics.jsonl`), history and the course's plots. Returns self."""
        args = self.train_args()
        trainable = Trainable.parse(args.trainable)
        device = distributed.init(args.device)  # under torchrun: this rank's device, process group joined
        main = distributed.is_main()
        progress = progress and main
        self._learn_classes(train, val)
        resuming = self._prepare_run(args, train, val, out_dir, resume)
        if resuming is None:
            return self
        dtype = resolve_precision(args.precision, device)
        start = time.perf_counter()

        backbone, self.tokenizer_ = load_model(self.model, **(self.model_options or {}))
        torch.manual_seed(args.seed)
        replace_head(backbone, len(self.classes_), bias=args.head_bias)
        classifier = SequenceClassifier(backbone, args.pooling, self._prefix_tokens()).to(device)
        n_trainable = apply_trainable(classifier, trainable)
        n_total = sum(p.numel() for p in classifier.parameters())
        log.info("trainable parameters: %s of %s (%s)", f"{n_trainable:,}", f"{n_total:,}", args.trainable)

        train_ids = self.tokenizer_.encode_batch(self._model_inputs(train.texts))
        longest = max(len(ids) for ids in train_ids)
        self.max_length_ = min(args.max_length or longest, backbone.context_length)
        windows = self._long_text_windows(args, train, val, backbone.context_length, backbone.context_length)
        if windows is not None:
            (train_w, train_doc), (val_w, val_doc) = windows
            train_enc, val_enc = self._encode(train_w), self._encode(val_w)
        else:
            train_enc, val_enc = self._encode(train, token_ids=train_ids), self._encode(val)
        for name, enc in (("training", train_enc), ("validation", val_enc)):
            if enc.truncated:
                log.info("%d %s text(s) truncated to %d tokens", enc.truncated, name, self.max_length_)
        class_weights = class_weight_tensor(args.class_weights, train_enc.labels, len(self.classes_))
        if class_weights is not None:
            named = zip(self.classes_, class_weights.tolist(), strict=True)
            log.info("class weights: %s", ", ".join(f"{c} {w:.3f}" for c, w in named))

        cache_from = classifier.cache_point(trainable.first_trainable_block(len(backbone.trf_blocks)))
        if not (args.cache_frozen and cache_from > 0 and backbone.cfg.drop_rate == 0):
            cache_from = None
        fixed = self.max_length_ if args.pooling == "last-position" else None
        common = dict(pad_id=self.tokenizer_.pad_id, fixed_length=fixed, device=device, dtype=dtype,
                      cache_from=cache_from, progress=progress)
        world = distributed.world_size()
        if world > 1:
            log.info("%d processes x batch %d x grad-accum %d = %d texts per optimizer step", world,
                     args.batch_size, args.grad_accum, world * args.batch_size * args.grad_accum)
        # Global batches: each rank trains on its slice of every one (ClassifierTraining).
        train_batches = Batches(classifier, train_enc, args.batch_size * world, bucket=args.bucket, name="(train)",
                                **common)
        val_batches = Batches(classifier, val_enc, args.eval_batch_size or args.batch_size, name="(validation)",
                              **common)
        writes = out_dir is not None and main  # only rank 0 writes
        state_dir = start_run(out_dir, self.run_) if writes else None
        log_file, tracker = None, NoTracker()
        if writes:
            log_file = open(Path(out_dir) / METRICS_LOG_FILE, "a" if resuming else "w", encoding="utf-8")  # noqa: SIM115
        try:
            training = ClassifierTraining(classifier, train_batches, val_batches, args, class_weights,
                                          state_dir=state_dir, metrics_log=log_file, progress=progress)
            state = distributed.broadcast(load_training_state(state_dir) if resuming and main else None)
            if state is not None:
                training.load_state_dict(state)
                log.info("resuming %s at epoch %d, step %d (batch %d of the epoch)", out_dir, training.epoch + 1,
                         training.history.global_step, training.batches_done)
            elif log_file is not None:  # no state to resume from: the run starts over, and so does its log
                log_file.truncate(0)
            # a run that starts over (no state loaded) starts its tracking run over too
            training.tracker = tracker = self._open_tracker(args, out_dir if writes else None, state is not None,
                                                            training.history.global_step, train, val, n_total,
                                                            n_trainable)
            self.history_ = training.run()
        except BaseException:
            tracker.close()
            raise
        finally:
            if log_file is not None:
                with contextlib.suppress(OSError):  # a write that failed (disk full) was reported already
                    log_file.close()
        merge_lora(classifier)
        self.model_ = classifier.eval()
        self.train_seconds_ = time.perf_counter() - start
        self.n_trainable_ = n_trainable
        # From the validation batches already built (with their cached frozen states): the same
        # metrics as `self.evaluate(val)` without another pass through the frozen layers.
        val_probs = self._activate(all_logits(classifier, val_batches)).numpy()
        refit = None
        if train_batches.cache_from == classifier.features_start and world == 1 \
                and self.label_thresholds is None:  # (multi-label has no blend to refit for)
            refit = functools.partial(self._refit_head, classifier, train_batches, val_batches, args, class_weights)
        if windows is not None:  # the windows' probabilities, aggregated per text
            val_probs = long_text.to_documents(val_probs, val_doc, len(val), args.aggregate)
            refit = None if refit is None else long_text.refit_by_document(refit, train_doc, args.aggregate)
        self.val_metrics_ = self._finish_fit(train, val, val_probs, refit, progress)
        self.last_step_ = self.history_.global_step
        track_final(tracker, {"validation": self.val_metrics_}, self.last_step_)
        if writes:
            self._save_finished_run(out_dir, state_dir)
        distributed.barrier()  # the model is saved before any rank returns
        return self

    def _refit_head(self, classifier: SequenceClassifier, train_vectors: Batches, val_vectors: Batches,
                    args: TrainArgs, class_weights: torch.Tensor | None, fold: int, fit: list[int],
                    held: list[int]) -> np.ndarray:
        """Probabilities of training texts `held` from a new head trained as the real one was (same options,
        same validation set for --select-by) on training texts `fit`: the out-of-fold predictions that the
        blend weights are fitted on. The batches hold the vectors the head reads (cached at
        `features_start`), so each step is one small matrix product. The trained head is put back."""
        backbone = classifier.backbone
        trained = backbone.out_head
        torch.manual_seed(args.seed + 1 + fold)
        try:
            replace_head(backbone, len(self.classes_), bias=args.head_bias)
            backbone.out_head.to(device=trained.weight.device, dtype=trained.weight.dtype)
            fold_args = dataclasses.replace(args, save_every=None)
            ClassifierTraining(classifier, train_vectors.subset(fit), val_vectors, fold_args, class_weights,
                               progress=False, say=log.debug).run()
            classifier.eval()
            return torch.softmax(all_logits(classifier, train_vectors.subset(held, bucket=False)), dim=-1).numpy()
        finally:
            backbone.out_head = trained

    def _why_no_refit(self) -> str:
        return ("only a head trained alone on cached frozen features (--trainable head, a backbone without dropout, "
                "one process) is refit on folds")

    def _prefix_tokens(self) -> int:
        """The template's tokens before the text, which mean pooling leaves out (unless `pool_template`)."""
        return 0 if self.pool_template else template_prefix_tokens(self.template_, self.tokenizer_)

    def _encode(self, data: LabelledTexts, with_labels: bool = True,
                token_ids: list[list[int]] | None = None) -> EncodedTexts:
        label_ids = self._label_ids(data) if with_labels else None
        return encode_texts(self._model_inputs(data.texts), self.tokenizer_, self.max_length_, label_ids, token_ids,
                            keep_last=template_suffix_tokens(self.template_, self.tokenizer_))

    def _plot(self, out_dir: Path) -> None:
        h = self.history_
        if h.train_losses:
            epochs = np.linspace(0, len(h.examples_at_epoch), len(h.train_losses)).tolist()
            plot_values(epochs, h.examples_at_eval, h.train_losses, h.val_losses, out_dir / "loss.png")
        epochs = list(range(1, len(h.train_accs) + 1))
        plot_values(epochs, h.examples_at_epoch, h.train_accs, h.val_accs, out_dir / "accuracy.png",
                    label="accuracy")

    # --- inference --------------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise NotFittedError("this TextClassifier is not trained yet: call fit() or load_classifier()")

    def _torch_module(self) -> torch.nn.Module:
        return self.model_

    def _explain_access(self):
        from llmclf.explain import ModelAccess

        self.model_.eval()
        fixed = self.max_length_ if self.model_.pooling == "last-position" else None
        return ModelAccess(self.model_, self.model_.backbone.tok_emb, next(self.model_.parameters()).device,
                           self.tokenizer_.pad_id, fixed)

    def _batches(self, enc: EncodedTexts, batch_size: int) -> Batches:
        device = next(self.model_.parameters()).device
        fixed = self.max_length_ if self.model_.pooling == "last-position" else None
        return Batches(self.model_, enc, batch_size, self.tokenizer_.pad_id, fixed, device,
                       resolve_precision(self.precision, device))

    @torch.no_grad()
    def _probabilities(self, texts: list[str], batch_size: int, dropout: bool) -> np.ndarray:
        batches = self._batches(self._encode(LabelledTexts(texts, []), with_labels=False), batch_size)
        order = inference_batches(batches.lengths, batch_size)
        out = np.empty((len(texts), len(self.classes_)), dtype=np.float32)
        for idx, (logits, _) in zip(order, iter_logits(self.model_, batches, dropout=dropout, order=order),
                                    strict=True):
            out[idx] = self._activate(logits).cpu().numpy()
        return out

    # --- persistence ------------------------------------------------------------------------

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Weights (safetensors, the book's names), config.json (labels, max_length, pooling,
        pad id, training options, the run's fingerprint and metrics), tokenizer files, n-grams and
        history. All are written first, then moved in together (config.json last): a save that fails
        (disk full, permission denied: WriteError) leaves the previous model in `out_dir` whole."""
        self._check_fitted()
        out_dir = Path(out_dir)
        history = getattr(self, "history_", None)
        with atomic_files(out_dir, last=CONFIG_FILE) as staging:
            if history is not None:
                atomic_write_json(staging / HISTORY_FILE, history.to_dict())
            self._save_blend(staging)
            save_checkpoint(
                staging, self.model_.backbone, self.tokenizer_, task="classification", engine="scratch",
                backbone=str(self.model), labels=self.classes_, max_length=self.max_length_,
                pooling=self.model_.pooling, pad_id=self.tokenizer_.pad_id, training=self.training_options(),
                input_template=self.template_, run=getattr(self, "run_", None), **self.fitted_config(),
                metrics=self._saved_metrics())
        return out_dir

    @classmethod
    def load(cls, path: str | os.PathLike, *, base_config: str | None = None, num_classes: int | None = None,
             labels: list[str] | None = None, pooling: str | None = None, max_length: int | None = None,
             precision: str = "auto", device: str | None = None, tokenizer_dir: str | None = None) -> TextClassifier:
        """A trained classifier from an llmclf directory, or from a bare state_dict file (e.g. the
        book's `review_classifier.pth`) with `base_config`, `num_classes`, `pooling`, `max_length`."""
        path = Path(path)
        config: dict[str, Any] = {}
        if path.is_dir():
            config = read_checkpoint_config(path)
            if config.get("task") != "classification":
                raise ConfigError(f"{path} is a language-model checkpoint, not a classifier")
        backbone, tokenizer = load_model(path, base_config=base_config, tokenizer_dir=tokenizer_dir)
        n_out = backbone.out_head.out_features
        if num_classes is not None and num_classes != n_out:
            raise ConfigError(f"{path} has {n_out} output classes, not --num-classes {num_classes}")
        if n_out == backbone.cfg.vocab_size:
            raise ConfigError(f"{path} is a language model (its head has {n_out} outputs), not a classifier")
        clf = cls(str(config.get("backbone", path)), **{
            **cls._saved_params(config), "pooling": pooling or config.get("pooling", "last"),
            "precision": precision, "device": device})
        clf.classes_ = labels or config.get("labels") or [str(i) for i in range(n_out)]
        if len(clf.classes_) != n_out:
            raise ConfigError(f"{len(clf.classes_)} labels given for a head with {n_out} outputs")
        clf.tokenizer_ = tokenizer
        clf.max_length_ = min(max_length or config.get("max_length") or backbone.context_length,
                              backbone.context_length)
        clf.config_ = config
        clf._restore_fitted(config, path)
        clf.model_ = SequenceClassifier(backbone, clf.pooling, clf._prefix_tokens()).to(resolve_device(device)).eval()
        return clf



TextClassifier.__doc__ += TrainArgs.docs("scratch")
