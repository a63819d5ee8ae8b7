"""Language-model loss, evaluation and the book's pretraining loop (`train_model_simple`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from llmclf.generation import generate
from llmclf.runtime import autocast
from llmclf.tokenizer import GPT2Tokenizer, text_to_token_ids, token_ids_to_text

log = logging.getLogger(__name__)


def calc_loss_batch(input_batch: torch.Tensor, target_batch: torch.Tensor, model: nn.Module,
                    device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Mean next-token cross-entropy of one batch (the book's function, plus mixed precision)."""
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    with autocast(device, dtype):
        logits = model(input_batch)
    return F.cross_entropy(logits.flatten(0, 1).float(), target_batch.flatten())


@torch.no_grad()
def calc_loss_loader(data_loader: DataLoader, model: nn.Module, device: torch.device,
                     num_batches: int | None = None, dtype: torch.dtype = torch.float32) -> float:
    """Mean of the per-batch losses over the first `num_batches` batches (all by default).

    NaN for an empty loader, as in the book.
    """
    if len(data_loader) == 0:
        return float("nan")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    total_loss = 0.0
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        total_loss += calc_loss_batch(input_batch, target_batch, model, device, dtype).item()
    return total_loss / num_batches


def perplexity(loss: float) -> float:
    """exp(cross-entropy): the effective number of equally likely next tokens."""
    return math.exp(loss) if loss < 700 else float("inf")


def evaluate_model(model: nn.Module, train_loader: DataLoader, val_loader: DataLoader, device: torch.device,
                   eval_iter: int, dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """Train and validation loss on `eval_iter` batches each, in eval mode."""
    was_training = model.training
    model.eval()
    train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter, dtype=dtype)
    val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter, dtype=dtype)
    model.train(was_training)
    return train_loss, val_loss


@torch.no_grad()
def generate_sample(model: nn.Module, tokenizer: GPT2Tokenizer, device: torch.device, start_context: str,
                    max_new_tokens: int = 50, dtype: torch.dtype = torch.float32) -> str:
    """Greedy continuation of `start_context`, on one line (the book's per-epoch sample)."""
    was_training = model.training
    model.eval()
    encoded = text_to_token_ids(start_context, tokenizer).to(device)
    with autocast(device, dtype):
        token_ids = generate(model, encoded, max_new_tokens=max_new_tokens)
    model.train(was_training)
    return token_ids_to_text(token_ids, tokenizer).replace("\n", " ")


@dataclass
class PretrainHistory:
    """What `train_model_simple` tracks; saved as JSON with checkpoints so training can resume."""

    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    track_tokens_seen: list[int] = field(default_factory=list)
    track_steps: list[int] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)
    epochs_done: int = 0
    global_step: int = -1
    tokens_seen: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def train_model_simple(model: nn.Module, train_loader: DataLoader, val_loader: DataLoader,
                       optimizer: torch.optim.Optimizer, device: torch.device, num_epochs: int,
                       eval_freq: int, eval_iter: int, start_context: str, tokenizer: GPT2Tokenizer,
                       dtype: torch.dtype = torch.float32, history: PretrainHistory | None = None,
                       on_epoch_end: Callable[[PretrainHistory], None] | None = None,
                       progress: bool = True) -> PretrainHistory:
    """The book's pretraining loop: AdamW steps, periodic evaluation, a sample per epoch.

    Args:
        history: continue from a saved history (epochs already done are skipped).
        on_epoch_end: called after each epoch, e.g. to write a checkpoint.
        progress: show a progress bar.
    """
    history = history or PretrainHistory()
    total_steps = num_epochs * len(train_loader)
    bar = tqdm(total=total_steps, initial=history.epochs_done * len(train_loader), disable=not progress,
               desc="pretrain", unit="step", dynamic_ncols=True)
    for epoch in range(history.epochs_done, num_epochs):
        model.train()
        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()
            loss = calc_loss_batch(input_batch, target_batch, model, device, dtype)
            loss.backward()
            optimizer.step()
            history.tokens_seen += input_batch.numel()
            history.global_step += 1
            bar.update(1)

            if history.global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, eval_iter, dtype)
                history.train_losses.append(train_loss)
                history.val_losses.append(val_loss)
                history.track_tokens_seen.append(history.tokens_seen)
                history.track_steps.append(history.global_step)
                bar.set_postfix(train_loss=f"{train_loss:.3f}", val_loss=f"{val_loss:.3f}")
                log.info("Ep %d (Step %06d): Train loss %.3f, Val loss %.3f",
                         epoch + 1, history.global_step, train_loss, val_loss)

        sample = generate_sample(model, tokenizer, device, start_context, dtype=dtype)
        history.samples.append(sample)
        history.epochs_done = epoch + 1
        log.info("%s", sample)
        if on_epoch_end is not None:
            on_epoch_end(history)
    bar.close()
    return history
