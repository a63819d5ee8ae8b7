"""Fine-tuning a classifier: the course's `train_classifier_simple` grown into the loop people
expect (learning-rate warmup and schedule, gradient clipping, AdamW without decay on biases, norms
and embeddings, weighted loss, best-model selection, early stopping), with dynamic padding, cached
frozen layers, mixed precision, a metrics log and training states that resume exactly."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import random
import signal
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, NoReturn

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from llmclf import distributed
from llmclf.data.classification import EncodedTexts, batch_order, collate
from llmclf.loaders.tensors import write_error
from llmclf.models.heads import SequenceClassifier
from llmclf.runtime import autocast, inference_autocast
from llmclf.tracking import NoTracker, Tracker, metric_names
from llmclf.training.args import TrainArgs
from llmclf.training.metrics import classification_scores
from llmclf.training.optim import Selection, classification_loss, make_optimizer, make_scheduler, metric_value
from llmclf.training.state import TrainingInterruptedError, fault_point, save_training_state, stop_requests

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # inputs (ids or cached states), mask, labels


STATE_CHUNK = 32  # texts per forward pass when caching frozen states (at least a batch)


def state_chunk(batch_size: int) -> int:
    """Texts per forward pass of `Batches`' frozen-state cache."""
    return max(batch_size, STATE_CHUNK)


def padded_tokens(lengths: list[int], chunk: int) -> int:
    """Token positions a frozen-state pass computes for texts of `lengths`: longest first, `chunk` texts
    a pass, each padded to its longest (what its time scales with)."""
    ordered = sorted(lengths, reverse=True)
    return sum(len(ordered[i:i + chunk]) * ordered[i] for i in range(0, len(ordered), chunk))


class Batches:
    """Batches of one data set, either token ids or cached frozen-layer states.

    `cache_from=k` runs the embedding and blocks `:k` once per text (in eval mode, no grad) and
    keeps each text's states; batches then carry those states and training runs only blocks
    `k:`. With `k = model.features_start` it keeps what the head reads, one vector per text (a head
    trained alone). Exact when the frozen part has no active dropout. `keep_features` also keeps, from the
    same pass, the head's features (`features`, for `as_features`: tune trains heads on them).
    """

    def __init__(self, model: SequenceClassifier, data: EncodedTexts, batch_size: int, pad_id: int,
                 fixed_length: int | None, device: torch.device, dtype: torch.dtype,
                 cache_from: int | None = None, bucket: bool = False, progress: bool = False, name: str = "",
                 keep_features: bool = False) -> None:
        self.data, self.batch_size, self.pad_id = data, batch_size, pad_id
        self.fixed_length, self.device, self.bucket = fixed_length, device, bucket
        self.cache_from = cache_from
        self.dtype = dtype
        self.lengths = [fixed_length or len(ids) for ids in data.ids]
        self.states: list[torch.Tensor] | None = None
        self.features: list[torch.Tensor] | None = None
        self.features_start = model.features_start
        if cache_from is not None:
            self.states, self.features = self._compute_states(model, dtype, progress, name, keep_features)
            if cache_from >= model.features_start:  # one vector per text
                self.lengths, self.fixed_length = [1] * len(self.states), None

    def __len__(self) -> int:
        return -(-len(self.data.ids) // self.batch_size)

    def subset(self, indices: list[int], bucket: bool | None = None) -> Batches:
        """These texts restricted to `indices`, sharing the cached states (for cross-validation)."""
        part = copy.copy(self)
        labels = [self.data.labels[i] for i in indices] if self.data.labels is not None else None
        part.data = EncodedTexts([self.data.ids[i] for i in indices], labels, 0)
        part.lengths = [self.lengths[i] for i in indices]
        part.states = [self.states[i] for i in indices] if self.states is not None else None
        part.features = [self.features[i] for i in indices] if self.features is not None else None
        part.bucket = self.bucket if bucket is None else bucket
        return part

    def as_features(self) -> Batches:
        """These texts as the head's features kept by `keep_features` (one vector per text)."""
        if self.features is None:
            raise ValueError("these batches kept no features (keep_features=False)")
        part = copy.copy(self)
        part.states, part.features, part.cache_from = self.features, None, self.features_start
        part.lengths, part.fixed_length = [1] * len(self.features), None
        return part

    def _compute_states(self, model: SequenceClassifier, dtype: torch.dtype, progress: bool, name: str,
                        keep_features: bool = False):
        was_training = model.training
        model.eval()
        # Longest first in big chunks: little padding, and memory peaks at once.
        order = sorted(range(len(self.lengths)), key=lambda i: -self.lengths[i])
        chunk = state_chunk(self.batch_size)
        mine = distributed.shard(order)  # several processes: each computes a share, then all get all
        by_index: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for start in tqdm(range(0, len(mine), chunk), desc=f"caching frozen layers {name}".strip(),
                          disable=not progress, unit="batch", leave=False):
            idx = mine[start:start + chunk]
            ids, mask = collate([self.data.ids[i] for i in idx], self.pad_id, self.fixed_length)
            attn = None if model.pooling == "last-position" else mask.to(self.device)
            with inference_autocast(model, self.device, dtype):
                if keep_features:
                    x, features = model.states_and_features(ids.to(self.device), attn, self.cache_from)
                else:
                    x, features = model.prefix_states(ids.to(self.device), attn, self.cache_from), None
            for row, i in enumerate(idx):  # compact copies: no view of the padded batch
                by_index[i] = x[row, : self.lengths[i]].clone(), None if features is None else features[row].clone()
        if distributed.world_size() > 1:
            shares = distributed.all_gather({i: tuple(t if t is None else t.cpu() for t in pair)
                                             for i, pair in by_index.items()})
            by_index = {i: tuple(t if t is None else t.to(self.device) for t in pair)  # type: ignore[misc]
                        for share in shares for i, pair in share.items()}
        model.train(was_training)
        states = [by_index[i][0] for i in range(len(order))]
        return states, [by_index[i][1] for i in range(len(order))] if keep_features else None

    def order(self, shuffle: bool = False, rng: random.Random | None = None) -> list[list[int]]:
        """Text indices per batch, in batch order (shuffled with `rng`)."""
        return batch_order(self.lengths, self.batch_size, shuffle, self.bucket, rng or random.Random(0))

    def iterate(self, shuffle: bool = False, rng: random.Random | None = None, limit: int | None = None,
                order: list[list[int]] | None = None):
        """Batches in `order` (text indices per batch), else in `self.order(shuffle, rng)`."""
        for batch_idx in (self.order(shuffle, rng) if order is None else order)[:limit]:
            yield self.make(batch_idx)

    def make(self, idx: list[int]) -> Batch:
        """The batch of the texts `idx`: (inputs, mask, labels)."""
        labels = torch.tensor([self.data.labels[i] for i in idx], dtype=torch.long) if self.data.labels else None
        if self.states is None:
            ids, mask = collate([self.data.ids[i] for i in idx], self.pad_id, self.fixed_length)
            return self._to_device(ids), self._to_device(mask), labels
        length = max(self.lengths[i] for i in idx)
        first = self.states[idx[0]]
        x = first.new_zeros((len(idx), length, first.shape[-1]))
        mask = torch.zeros((len(idx), length), dtype=torch.long)
        for row, i in enumerate(idx):
            x[row, : self.lengths[i]] = self.states[i]
            mask[row, : self.lengths[i]] = 1
        return x.to(self.device), self._to_device(mask), labels

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        """A CPU tensor on the batches' device; to a GPU from pinned memory, without waiting."""
        if self.device.type != "cuda":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)


def classifier_logits(model: SequenceClassifier | DistributedDataParallel, batches: Batches, inputs: torch.Tensor,
                      mask: torch.Tensor) -> torch.Tensor:
    attn = None if distributed.unwrap(model).pooling == "last-position" else mask
    if batches.states is None:
        return model(inputs, attn)
    return model(inputs, attn, start=batches.cache_from)


def calc_loss_batch(model: SequenceClassifier, batches: Batches, batch: Batch,
                    class_weights: torch.Tensor | None = None) -> torch.Tensor:
    inputs, mask, labels = batch
    with autocast(batches.device, batches.dtype):
        logits = classifier_logits(model, batches, inputs, mask)
    return classification_loss(logits, labels, class_weights)


@torch.no_grad()
def iter_logits(model: SequenceClassifier, batches: Batches, num_batches: int | None = None, dropout: bool = False,
                order: list[list[int]] | None = None):
    """(float32 logits, labels) per batch (of `order`, if given), in the batches' precision; in eval
    mode unless `dropout` (MC-dropout passes)."""
    was_training = model.training
    model.train(dropout)
    try:
        for inputs, mask, labels in batches.iterate(limit=num_batches, order=order):
            with inference_autocast(model, batches.device, batches.dtype):
                logits = classifier_logits(model, batches, inputs, mask)
            yield logits.float(), labels
    finally:
        model.train(was_training)


def calc_loss_and_accuracy(model: SequenceClassifier, batches: Batches,
                           num_batches: int | None = None) -> tuple[float, float]:
    """Mean loss (per example) and accuracy over the first `num_batches` batches (all by default).

    Unlike the course notes' version, every batch counts (no early return after the first).
    """
    total_loss, correct, count = 0.0, 0, 0
    for logits, labels in iter_logits(model, batches, num_batches):
        labels = labels.to(logits.device)
        total_loss += classification_loss(logits, labels, reduction="sum").item()
        hits = ((logits >= 0) == labels.bool()).all(-1) if labels.ndim == 2 else logits.argmax(-1) == labels
        correct += hits.sum().item()
        count += len(labels)
    if count == 0:
        return float("nan"), float("nan")
    return total_loss / count, correct / count


def all_logits(model: SequenceClassifier, batches: Batches) -> torch.Tensor:
    """Float32 logits (N, classes) of every text of `batches`, on the CPU, in their order. Several
    processes each compute a share and gather the rest, so every rank gets every row once."""
    n = len(batches.data.ids)
    mine = distributed.shard(range(n))
    part = batches.subset(mine, bucket=False)
    logits = [chunk.cpu() for chunk, _ in iter_logits(model, part)]
    local = torch.cat(logits) if logits else torch.zeros((0, distributed.unwrap(model).num_classes))
    if distributed.world_size() == 1:
        return local
    out = torch.empty((n, local.shape[1]))
    for indices, rows in distributed.all_gather((mine, local)):
        out[indices] = rows
    return out


def evaluate_batches(model: SequenceClassifier, batches: Batches) -> dict[str, float]:
    """Loss (unweighted mean), accuracy and macro-F1 over every text: one full evaluation (over
    all ranks' shares when several processes run)."""
    if not batches.data.ids:
        return {"loss": float("nan"), "accuracy": float("nan"), "macro_f1": float("nan")}
    logits, y_true = all_logits(model, batches), torch.tensor(batches.data.labels)
    loss = classification_loss(logits, y_true, reduction="sum").item()
    return {"loss": loss / len(y_true), **classification_scores(logits.numpy(), y_true.numpy())}


@dataclass
class ClassifierHistory:
    """The course's tracked values, plus every full validation evaluation and the best one."""

    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    examples_at_eval: list[int] = field(default_factory=list)
    train_accs: list[float] = field(default_factory=list)
    val_accs: list[float] = field(default_factory=list)
    examples_at_epoch: list[int] = field(default_factory=list)
    # one entry per full validation evaluation (after every epoch, or every --eval-freq steps)
    val_accuracy_full: list[float] = field(default_factory=list)
    val_loss_full: list[float] = field(default_factory=list)
    val_macro_f1_full: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_epochs: list[float] = field(default_factory=list)
    select_by: str = "accuracy"
    best_epoch: float = 0  # epoch (fractional with --eval-freq) of the kept weights
    best_step: int = 0
    best_val_accuracy: float = 0.0
    best_val_loss: float = float("inf")
    best_val_macro_f1: float = 0.0
    stopped_early: bool = False
    examples_seen: int = 0
    global_step: int = 0  # optimizer steps taken
    lr: list[float] = field(default_factory=list)  # learning rate at each logged step

    def to_dict(self) -> dict:
        return asdict(self)


class ClassifierTraining:
    """The scratch engine's training loop over prepared batches, with a resumable state.

    Under several processes (`llmclf.distributed`), `train` holds the global batches (per-rank
    batch size x world size, one seeded order on every rank); each rank computes the loss of its
    slice of every global batch, DDP averages the gradients (skipping the all-reduce while
    accumulating), so the steps equal one process's on the same global batches. Evaluations are
    over every rank's share; only rank 0 logs, writes the metrics log and training states.

    Every optimizer step: warmup/schedule, optional clipping, AdamW (parameter groups). Every
    `log_every` steps, the course's train/validation loss estimate on `eval_iter` batches. After
    every epoch (or every `eval_freq` steps and after the last one), a full validation evaluation:
    the best by `select_by` (ties: lower loss) keeps its weights; `patience` evaluations without a
    better one stop training. With `state_dir`, a complete training state is written after every
    epoch and every `save_every` steps; `load_state_dict` of one continues exactly where it was.
    """

    def __init__(self, model: SequenceClassifier, train: Batches, val: Batches, args: TrainArgs,
                 class_weights: torch.Tensor | None = None, state_dir: Path | None = None,
                 metrics_log: IO[str] | None = None, progress: bool = True,
                 say: Callable[[str], None] | None = None) -> None:
        self.model, self.train, self.val, self.args = model, train, val, args
        self.class_weights = class_weights
        self.state_dir, self.metrics_log, self.progress = state_dir, metrics_log, progress
        self.say = say or log.info
        self.trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.world, self.main = distributed.world_size(), distributed.is_main()
        self.ddp: SequenceClassifier | DistributedDataParallel = model
        if self.world > 1:  # every rank starts from the same seeded weights: no initial broadcast
            device_ids = [train.device] if train.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(model, device_ids=device_ids, init_sync=False)
        self.optimizer = make_optimizer(model, args.lr, args.weight_decay)
        self.steps_per_epoch = math.ceil(len(train) / args.grad_accum)
        self.total_steps = self.steps_per_epoch * args.epochs
        self.scheduler = make_scheduler(self.optimizer, self.total_steps, args.warmup, args.lr_schedule)
        self.rng = random.Random(args.seed)
        self.epoch_rng_state = self.rng.getstate()  # data order of the epoch in progress comes from this
        self.epoch, self.batches_done = 0, 0  # epochs finished; batches of the current epoch done
        self.history = ClassifierHistory(select_by=args.select_by)
        self.selection = Selection(args.select_by)
        self.best_state = self._snapshot()
        self.finished = False
        self.saved_step: int | None = None  # the optimizer step of the newest training state written
        self.tracker: Tracker = NoTracker()  # `--report-to`: set by the engine on rank 0 (llmclf.tracking)

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self.trainable.items()}

    # --- resumable state ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything that decides the rest of the run (loadable with `torch.load(weights_only=True)`)."""
        return {"format": "llmclf-training-state", "format_version": 1,
                "trainable": {n: p.detach().cpu().clone() for n, p in self.trainable.items()},
                "best": {n: t.cpu() for n, t in self.best_state.items()},
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "epoch_rng_state": self.epoch_rng_state, "torch_rng_state": torch.get_rng_state(),
                "cuda_rng_states": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "epoch": self.epoch, "batches_done": self.batches_done, "finished": self.finished,
                "history": self.history.to_dict(), "selection": self.selection.to_dict(),
                "metrics_log_bytes": self.metrics_log.tell() if self.metrics_log is not None else 0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for name, p in self.trainable.items():
                p.copy_(state["trainable"][name])
        device = next(iter(self.trainable.values())).device
        self.best_state = {n: t.to(device) for n, t in state["best"].items()}
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch_rng_state = _as_random_state(state["epoch_rng_state"])
        torch.set_rng_state(state["torch_rng_state"])
        if state["cuda_rng_states"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng_states"])
        self.epoch, self.batches_done, self.finished = state["epoch"], state["batches_done"], state["finished"]
        self.history = ClassifierHistory(**state["history"])
        self.selection = Selection.from_dict(state["selection"])
        if self.metrics_log is not None:  # drop what the killed process logged after this state
            self.metrics_log.truncate(state["metrics_log_bytes"])
            self.metrics_log.seek(state["metrics_log_bytes"])

    def save_state(self) -> None:
        if self.state_dir is not None:
            save_training_state(self.state_dir, self.history.global_step, self.state_dict())
            self.saved_step = self.history.global_step

    # --- the loop -----------------------------------------------------------------------------

    def _write(self, record: dict) -> None:
        self.tracker.log_metrics(metric_names(record), record["step"])
        if self.metrics_log is not None:
            try:
                self.metrics_log.write(json.dumps(record) + "\n")
                self.metrics_log.flush()
            except OSError as exc:  # e.g. the disk is full: say which file
                raise write_error(exc, getattr(self.metrics_log, "name", "the metrics log"), any_file=True) from exc

    def run(self) -> ClassifierHistory:
        """Train to the end (from wherever the loaded state was); keep the best weights.

        With a `state_dir`, in one process: SIGINT or SIGTERM stops training at the next optimizer step,
        whose state is saved first, with TrainingInterruptedError (a second signal stops at once)."""
        args, h = self.args, self.history
        bar = tqdm(total=args.epochs * len(self.train), initial=self.epoch * len(self.train) + self.batches_done,
                   desc="train", unit="batch", disable=not self.progress, dynamic_ncols=True)
        # Several processes are left as they were: torchrun's agent stops workers with SIGTERM (and restarts them).
        with stop_requests(self.state_dir is not None and self.world == 1) as signalled:
            while not self.finished and self.epoch < args.epochs:
                self.rng.setstate(self.epoch_rng_state)
                order = self.train.order(shuffle=True, rng=self.rng)
                self.model.train()
                self.optimizer.zero_grad()
                stop = False
                for batch_no in range(self.batches_done, len(order)):
                    accumulating = (batch_no + 1) % args.grad_accum and batch_no + 1 != len(order)
                    no_sync = self.ddp.no_sync() if accumulating and self.world > 1 else contextlib.nullcontext()
                    with no_sync:
                        loss = self._global_batch_loss(order[batch_no])
                        (loss / args.grad_accum).backward()
                    h.examples_seen += len(order[batch_no])
                    bar.update(1)
                    if accumulating:
                        continue
                    stop = self._step(self._reported(loss), batch_no + 1)
                    if stop:
                        break
                    if signalled.signum is not None and batch_no + 1 < len(order):  # (an epoch's end saves below)
                        self._interrupted(signalled.signum, bar)
                if stop:  # patience ran out at an evaluation within the epoch (--eval-freq)
                    self.finished = True
                    self.save_state()
                else:
                    self._end_epoch()  # (its training state is marked finished after the last epoch)
                if signalled.signum is not None and not self.finished:
                    self._interrupted(signalled.signum, bar)
        bar.close()
        with torch.no_grad():
            for name, p in self.trainable.items():
                p.copy_(self.best_state[name])
        if h.best_step != h.global_step:
            self.say(f"restored the weights of step {h.best_step} (epoch {h.best_epoch:g}; validation "
                     f"{self.args.select_by} {self._best_score():.4f})")
        return h

    def _interrupted(self, signum: int, bar: tqdm) -> NoReturn:
        """Save the state of this step (unless it is saved) and stop with TrainingInterruptedError."""
        bar.close()
        if self.saved_step != self.history.global_step:
            self.save_state()
        where = (f"epoch {self.epoch + 1}, batch {self.batches_done} of {len(self.train)}" if self.batches_done
                 else f"the end of epoch {self.epoch}")
        raise TrainingInterruptedError(
            f"training stopped by {signal.Signals(signum).name} after optimizer step {self.history.global_step} "
            f"of {self.total_steps} ({where}); its state is saved in {self.state_dir}: continue the run with "
            "--resume", signum)

    def _global_batch_loss(self, indices: list[int]) -> torch.Tensor:
        """This rank's part of the loss of global batch `indices` (its contiguous slice): the summed,
        class-weighted loss of its texts over the global batch's total weight, times the world size
        (DDP averages over ranks). One process: the batch's (weighted) mean loss."""
        labels = torch.tensor([self.train.data.labels[i] for i in indices])
        weighted = self.class_weights is not None and labels.ndim == 1  # (multi-label: pos_weight, a mean per text)
        total = float(self.class_weights[labels].sum()) if weighted else float(len(indices))
        start, stop = (len(indices) * r // self.world for r in (distributed.rank(), distributed.rank() + 1))
        mine = indices[start:stop]
        # A rank with no text in a short last batch still joins the step (DDP's all-reduce) with zero loss.
        inputs, mask, y = self.train.make(mine or indices[:1])
        with autocast(self.train.device, self.train.dtype):
            logits = classifier_logits(self.ddp, self.train, inputs, mask)
        loss = classification_loss(logits, y, self.class_weights, reduction="sum") * (self.world / total)
        return loss if mine else loss * 0.0

    def _reported(self, loss: torch.Tensor) -> float:
        """The global batch's loss (summed over ranks; each rank's part is scaled by the world size)."""
        if self.world == 1:
            return loss.item()
        total = loss.detach().clone()
        torch.distributed.all_reduce(total)
        return total.item() / self.world

    def _best_score(self) -> float:
        return metric_value(self.selection.best, self.args.select_by) if self.selection.best else float("nan")

    def _step(self, last_loss: float, batches_done: int) -> bool:
        """One optimizer step after `batches_done` batches of this epoch; True to stop training."""
        args, h = self.args, self.history
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable.values(), args.max_grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        h.global_step += 1
        self.batches_done = batches_done
        self._write({"event": "step", "epoch": self.epoch + 1, "step": h.global_step,
                     "examples_seen": h.examples_seen, "loss": round(last_loss, 6), "lr": lr})
        fault_point("step", h.global_step)
        if h.global_step % args.log_every == 0 and self.main:
            self._log_losses(lr)
        stop = False
        last_step = h.global_step == self.total_steps
        if args.eval_freq is not None and (h.global_step % args.eval_freq == 0 or last_step):
            stop = self._evaluate()
        if (args.save_every is not None and h.global_step % args.save_every == 0
                and batches_done != len(self.train) and not stop):
            self.save_state()  # (the end of an epoch saves anyway)
        return stop

    def _log_losses(self, lr: float) -> None:
        h = self.history
        train_loss, _ = calc_loss_and_accuracy(self.model, self.train, self.args.eval_iter)
        val_loss, _ = calc_loss_and_accuracy(self.model, self.val, self.args.eval_iter)
        self.model.train()
        h.train_losses.append(train_loss)
        h.val_losses.append(val_loss)
        h.examples_at_eval.append(h.examples_seen)
        h.lr.append(lr)
        self._write({"event": "eval", "epoch": self.epoch + 1, "step": h.global_step,
                     "examples_seen": h.examples_seen, "train_loss": train_loss, "val_loss": val_loss})
        self.say(f"Ep {self.epoch + 1} (Step {h.global_step:06d}): "
                 f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")

    def _evaluate(self) -> bool:
        """A full validation evaluation as a candidate for the best model; True to stop (patience)."""
        h = self.history
        metrics = evaluate_batches(self.model, self.val)
        self.model.train()
        epoch = round(self.epoch + self.batches_done / len(self.train), 4)
        h.val_accuracy_full.append(metrics["accuracy"])
        h.val_loss_full.append(metrics["loss"])
        h.val_macro_f1_full.append(metrics["macro_f1"])
        h.eval_steps.append(h.global_step)
        h.eval_epochs.append(epoch)
        self._write({"event": "validation", "epoch": epoch, "step": h.global_step, **metrics})
        if self.selection.update({**metrics, "step": h.global_step, "epoch": epoch}):
            self.best_state = self._snapshot()
            h.best_epoch, h.best_step = epoch, h.global_step
            h.best_val_accuracy, h.best_val_loss = metrics["accuracy"], metrics["loss"]
            h.best_val_macro_f1 = metrics["macro_f1"]
        self.say(f"validation: accuracy {metrics['accuracy'] * 100:.2f}%, macro-F1 {metrics['macro_f1']:.4f}, "
                 f"loss {metrics['loss']:.4f} (step {h.global_step}; best by {self.args.select_by}: "
                 f"step {h.best_step})")
        if self.selection.should_stop(self.args.patience):
            h.stopped_early = True
            self.say(f"early stop: no better validation {self.args.select_by} in {self.args.patience} evaluation(s)")
            return True
        return False

    def _end_epoch(self) -> None:
        """The course's per-epoch accuracies, the epoch's evaluation and a training state."""
        h, args = self.history, self.args
        if self.main:  # the course's estimates are for the log: other ranks skip them
            _, train_acc = calc_loss_and_accuracy(self.model, self.train, args.eval_iter)
            _, val_acc = calc_loss_and_accuracy(self.model, self.val, args.eval_iter)
            h.train_accs.append(train_acc)
            h.val_accs.append(val_acc)
            h.examples_at_epoch.append(h.examples_seen)
            self._write({"event": "epoch", "epoch": self.epoch + 1, "step": h.global_step,
                         "train_accuracy": train_acc, "val_accuracy": val_acc})
            self.say(f"Training accuracy: {train_acc * 100:.2f}% | Validation accuracy: {val_acc * 100:.2f}% "
                     f"(on {args.eval_iter} batches)")
        self.epoch += 1
        self.batches_done = 0
        self.epoch_rng_state = self.rng.getstate()
        stop = self._evaluate() if args.eval_freq is None else False
        self.finished = stop or self.epoch == args.epochs
        self.save_state()


def _as_random_state(state: Any) -> tuple:
    """`random.Random.getstate()` back from its saved form (lists where tuples were)."""
    version, internal, gauss = state
    return version, tuple(internal), gauss


def train_classifier(model: SequenceClassifier, train: Batches, val: Batches, args: TrainArgs,
                     class_weights: torch.Tensor | None = None, progress: bool = True,
                     say: Callable[[str], None] | None = None) -> ClassifierHistory:
    """Train in memory (no training states): `ClassifierTraining(...).run()`."""
    return ClassifierTraining(model, train, val, args, class_weights, progress=progress, say=say).run()
