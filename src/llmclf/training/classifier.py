"""Fine-tuning a classifier: the course's `train_classifier_simple`, with dynamic padding,
cached frozen layers, mixed precision, early stopping and a metrics log."""

from __future__ import annotations

import copy
import json
import logging
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import IO

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from llmclf.data.classification import EncodedTexts, batch_order, collate
from llmclf.models.heads import SequenceClassifier
from llmclf.runtime import autocast

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # inputs (ids or cached states), mask, labels


class Batches:
    """Batches of one data set, either token ids or cached frozen-layer states.

    `cache_from=k` runs the embedding and blocks `:k` once per text (in eval mode, no grad) and
    keeps each text's states; batches then carry those states and training runs only blocks
    `k:`. Exact when the frozen part has no active dropout.
    """

    def __init__(self, model: SequenceClassifier, data: EncodedTexts, batch_size: int, pad_id: int,
                 fixed_length: int | None, device: torch.device, dtype: torch.dtype,
                 cache_from: int | None = None, bucket: bool = False, progress: bool = False, name: str = "") -> None:
        self.data, self.batch_size, self.pad_id = data, batch_size, pad_id
        self.fixed_length, self.device, self.bucket = fixed_length, device, bucket
        self.cache_from = cache_from
        self.dtype = dtype
        self.lengths = [fixed_length or len(ids) for ids in data.ids]
        self.states: list[torch.Tensor] | None = None
        if cache_from is not None:
            self.states = self._compute_states(model, dtype, progress, name)

    def __len__(self) -> int:
        return -(-len(self.data.ids) // self.batch_size)

    def subset(self, indices: list[int], bucket: bool | None = None) -> Batches:
        """These texts restricted to `indices`, sharing the cached states (for cross-validation)."""
        part = copy.copy(self)
        labels = [self.data.labels[i] for i in indices] if self.data.labels is not None else None
        part.data = EncodedTexts([self.data.ids[i] for i in indices], labels, 0)
        part.lengths = [self.lengths[i] for i in indices]
        part.states = [self.states[i] for i in indices] if self.states is not None else None
        part.bucket = self.bucket if bucket is None else bucket
        return part

    def _compute_states(self, model: SequenceClassifier, dtype: torch.dtype, progress: bool, name: str):
        was_training = model.training
        model.eval()
        # Longest first in big chunks: little padding, and memory peaks at once.
        order = sorted(range(len(self.lengths)), key=lambda i: -self.lengths[i])
        chunk = max(self.batch_size, 32)
        by_index: dict[int, torch.Tensor] = {}
        for start in tqdm(range(0, len(order), chunk), desc=f"caching frozen layers {name}".strip(),
                          disable=not progress, unit="batch", leave=False):
            idx = order[start:start + chunk]
            ids, mask = collate([self.data.ids[i] for i in idx], self.pad_id, self.fixed_length)
            attn = None if model.pooling == "last-position" else mask.to(self.device)
            with autocast(self.device, dtype):
                x = model.prefix_states(ids.to(self.device), attn, self.cache_from)
            for row, i in enumerate(idx):
                by_index[i] = x[row, : self.lengths[i]].clone()  # compact: no view of the padded batch
        states = [by_index[i] for i in range(len(order))]
        model.train(was_training)
        return states

    def iterate(self, shuffle: bool = False, rng: random.Random | None = None, limit: int | None = None):
        order = batch_order(self.lengths, self.batch_size, shuffle, self.bucket, rng or random.Random(0))
        for batch_idx in order[:limit]:
            yield self._make(batch_idx)

    def _make(self, idx: list[int]) -> Batch:
        labels = torch.tensor([self.data.labels[i] for i in idx], dtype=torch.long) if self.data.labels else None
        if self.states is None:
            ids, mask = collate([self.data.ids[i] for i in idx], self.pad_id, self.fixed_length)
            return ids.to(self.device), mask.to(self.device), labels
        length = max(self.lengths[i] for i in idx)
        first = self.states[idx[0]]
        x = first.new_zeros((len(idx), length, first.shape[-1]))
        mask = torch.zeros((len(idx), length), dtype=torch.long)
        for row, i in enumerate(idx):
            x[row, : self.lengths[i]] = self.states[i]
            mask[row, : self.lengths[i]] = 1
        return x.to(self.device), mask.to(self.device), labels


def classifier_logits(model: SequenceClassifier, batches: Batches, inputs: torch.Tensor,
                      mask: torch.Tensor) -> torch.Tensor:
    attn = None if model.pooling == "last-position" else mask
    if batches.states is None:
        return model(inputs, attn)
    return model.forward_from(inputs, attn, start=batches.cache_from)


def calc_loss_batch(model: SequenceClassifier, batches: Batches, batch: Batch) -> torch.Tensor:
    inputs, mask, labels = batch
    with autocast(batches.device, batches.dtype):
        logits = classifier_logits(model, batches, inputs, mask)
    return F.cross_entropy(logits.float(), labels.to(logits.device))


@torch.no_grad()
def iter_logits(model: SequenceClassifier, batches: Batches, num_batches: int | None = None, dropout: bool = False):
    """(float32 logits, labels) per batch, in the batches' precision; in eval mode unless
    `dropout` (MC-dropout passes)."""
    was_training = model.training
    model.train(dropout)
    try:
        for inputs, mask, labels in batches.iterate(limit=num_batches):
            with autocast(batches.device, batches.dtype):
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
        total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(-1) == labels).sum().item()
        count += len(labels)
    if count == 0:
        return float("nan"), float("nan")
    return total_loss / count, correct / count


@dataclass
class ClassifierHistory:
    """The course's tracked values, plus per-epoch full validation accuracy."""

    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    examples_at_eval: list[int] = field(default_factory=list)
    train_accs: list[float] = field(default_factory=list)
    val_accs: list[float] = field(default_factory=list)
    examples_at_epoch: list[int] = field(default_factory=list)
    val_accuracy_full: list[float] = field(default_factory=list)
    val_loss_full: list[float] = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float = 0.0
    best_val_loss: float = float("inf")
    stopped_early: bool = False
    examples_seen: int = 0
    global_step: int = -1

    def to_dict(self) -> dict:
        return asdict(self)


def train_classifier_simple(model: SequenceClassifier, train: Batches, val: Batches,
                            optimizer: torch.optim.Optimizer, num_epochs: int, eval_freq: int, eval_iter: int,
                            grad_accum: int = 1, patience: int | None = None,
                            seed: int = 123, metrics_log: IO[str] | None = None, progress: bool = True,
                            on_eval: Callable[[str], None] | None = None) -> ClassifierHistory:
    """Train; keep the weights of the epoch with the best full validation accuracy (ties: lower loss).

    Every `eval_freq` optimizer steps, train/val loss on `eval_iter` batches; after each epoch,
    train/val accuracy on `eval_iter` batches (the course's output) and the full validation accuracy,
    which drives early stopping (`patience` epochs without improvement) and best-weight keeping.
    """
    history = ClassifierHistory()
    rng = random.Random(seed)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    best_state = {name: p.detach().clone() for name, p in trainable.items()}
    epochs_without_gain = 0
    say = on_eval or log.info
    bar = tqdm(total=num_epochs * len(train), desc="train", unit="batch", disable=not progress, dynamic_ncols=True)

    def write(record: dict) -> None:
        if metrics_log is not None:
            metrics_log.write(json.dumps(record) + "\n")
            metrics_log.flush()

    for epoch in range(num_epochs):
        model.train()
        optimizer.zero_grad()
        for batch_no, batch in enumerate(train.iterate(shuffle=True, rng=rng)):
            loss = calc_loss_batch(model, train, batch)
            (loss / grad_accum).backward()
            history.examples_seen += len(batch[2])
            bar.update(1)
            if (batch_no + 1) % grad_accum and batch_no + 1 != len(train):
                continue
            optimizer.step()
            optimizer.zero_grad()
            history.global_step += 1
            write({"event": "step", "epoch": epoch + 1, "step": history.global_step,
                   "examples_seen": history.examples_seen, "loss": round(loss.item(), 6)})
            if history.global_step % eval_freq == 0:
                train_loss, _ = calc_loss_and_accuracy(model, train, eval_iter)
                val_loss, _ = calc_loss_and_accuracy(model, val, eval_iter)
                history.train_losses.append(train_loss)
                history.val_losses.append(val_loss)
                history.examples_at_eval.append(history.examples_seen)
                bar.set_postfix(train_loss=f"{train_loss:.3f}", val_loss=f"{val_loss:.3f}")
                write({"event": "eval", "epoch": epoch + 1, "step": history.global_step,
                       "examples_seen": history.examples_seen, "train_loss": train_loss, "val_loss": val_loss})
                say(f"Ep {epoch + 1} (Step {history.global_step:06d}): "
                    f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")

        _, train_acc = calc_loss_and_accuracy(model, train, eval_iter)
        _, val_acc = calc_loss_and_accuracy(model, val, eval_iter)
        val_loss_full, val_acc_full = calc_loss_and_accuracy(model, val)
        history.train_accs.append(train_acc)
        history.val_accs.append(val_acc)
        history.val_accuracy_full.append(val_acc_full)
        history.val_loss_full.append(val_loss_full)
        history.examples_at_epoch.append(history.examples_seen)
        write({"event": "epoch", "epoch": epoch + 1, "step": history.global_step, "train_accuracy": train_acc,
               "val_accuracy": val_acc, "val_accuracy_full": val_acc_full, "val_loss_full": val_loss_full})
        say(f"Training accuracy: {train_acc * 100:.2f}% | Validation accuracy: {val_acc * 100:.2f}% "
            f"(full validation set: {val_acc_full * 100:.2f}%, loss {val_loss_full:.4f})")
        # Small validation sets tie often (one text of 149 is 0.67 %): then the lower loss wins.
        if (epoch == 0 or val_acc_full > history.best_val_accuracy
                or (val_acc_full == history.best_val_accuracy and val_loss_full < history.best_val_loss)):
            history.best_val_accuracy, history.best_epoch = val_acc_full, epoch + 1
            history.best_val_loss = val_loss_full
            best_state = {name: p.detach().clone() for name, p in trainable.items()}
            epochs_without_gain = 0
        else:
            epochs_without_gain += 1
            if patience is not None and epochs_without_gain >= patience:
                history.stopped_early = True
                say(f"early stop: no validation gain for {patience} epoch(s)")
                break
    bar.close()
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(best_state[name])
    if history.best_epoch != len(history.val_accuracy_full):
        say(f"restored the weights of epoch {history.best_epoch} "
            f"(validation accuracy {history.best_val_accuracy * 100:.2f}%)")
    return history
