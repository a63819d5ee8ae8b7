"""The language-model half of the Python API: load a model, generate, evaluate, pretrain.

The classifier half is `llmclf.classifier`; the CLI's generate / lm-eval / pretrain commands are
thin layers over these functions.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from llmclf.data.lm import create_dataloader_v1, split_text
from llmclf.errors import CheckpointError, ConfigError
from llmclf.generation import generate
from llmclf.loaders.checkpoint import WEIGHTS_FILE, save_checkpoint
from llmclf.loaders.spec import DEFAULT_SEED, load_model
from llmclf.loaders.tensors import (
    atomic_torch_save,
    atomic_write_json,
    load_state_dict_checked,
    load_torch_file,
    read_tensor_file,
)
from llmclf.models.gpt2 import GPTModel
from llmclf.runtime import autocast, resolve_device, resolve_precision
from llmclf.tokenizer import GPT2Tokenizer, text_to_token_ids, token_ids_to_text
from llmclf.training.lm import PretrainHistory, calc_loss_loader, perplexity, train_model_simple
from llmclf.training.plots import plot_values

log = logging.getLogger(__name__)

MAX_LM_WINDOW = 1024  # GPT-2's context; long-context models would otherwise need texts of 8k+ tokens

__all__ = ["load_model", "generate_text", "evaluate_lm", "LMEvalResult", "pretrain"]


def generate_text(model: GPTModel, tokenizer: GPT2Tokenizer, prompt: str, *, max_new_tokens: int = 50,
                  temperature: float = 0.0, top_k: int | None = None, seed: int | None = None,
                  use_kv_cache: bool = True, stop_at_eos: bool = True, precision: str = "auto",
                  device: str | None = None) -> str:
    """Continue `prompt`; greedy unless `temperature` > 0. Returns prompt + continuation."""
    if not prompt:
        raise ConfigError("the prompt is empty; give some text to continue")
    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev)
    model = model.to(dev).eval()
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=dev)
        generator.manual_seed(DEFAULT_SEED if seed is None else seed)
    idx = text_to_token_ids(prompt, tokenizer).to(dev)
    if idx.shape[1] >= model.context_length:
        raise ConfigError(f"the prompt has {idx.shape[1]} tokens; the model's context is {model.context_length}")
    with autocast(dev, dtype):
        out = generate(model, idx, max_new_tokens, temperature=temperature, top_k=top_k,
                       eos_id=tokenizer.eos_id if stop_at_eos else None, use_kv_cache=use_kv_cache,
                       generator=generator)
    return token_ids_to_text(out, tokenizer)


@dataclass
class LMEvalResult:
    train_loss: float
    val_loss: float
    train_perplexity: float
    val_perplexity: float
    train_batches: int
    val_batches: int

    def to_dict(self) -> dict:
        return asdict(self)


def _lm_loaders(model: GPTModel, tokenizer: GPT2Tokenizer, text: str, stride: int | None, batch_size: int,
                train_ratio: float, seed: int) -> tuple:
    """The book's loaders: windows of the model's context length (at most 1,024 tokens; set a
    shorter context to change it), train shuffled with drop_last."""
    train_text, val_text = split_text(text, train_ratio)
    max_length = min(model.context_length, MAX_LM_WINDOW)
    stride = stride or max_length
    generator = torch.Generator().manual_seed(seed)
    train_loader = create_dataloader_v1(train_text, tokenizer, batch_size, max_length, stride, shuffle=True,
                                        drop_last=True, name="the training part of the text",
                                        generator=generator)
    val_loader = create_dataloader_v1(val_text, tokenizer, batch_size, max_length, stride, shuffle=False,
                                      drop_last=False, name="the validation part of the text")
    return train_loader, val_loader, generator


def evaluate_lm(model: GPTModel, tokenizer: GPT2Tokenizer, text: str, *, stride: int | None = None,
                batch_size: int = 2, train_ratio: float = 0.9, seed: int = DEFAULT_SEED,
                precision: str = "auto", device: str | None = None) -> LMEvalResult:
    """Cross-entropy and perplexity of `model` on a text, split as the book does.

    The first `train_ratio` of the characters is the training part, the rest validation; each is
    cut into windows of the model's context length every `stride` tokens (default: no overlap).
    """
    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev)
    model = model.to(dev).eval()
    train_loader, val_loader, _ = _lm_loaders(model, tokenizer, text, stride, batch_size, train_ratio, seed)
    train_loss = calc_loss_loader(train_loader, model, dev, dtype=dtype)
    val_loss = calc_loss_loader(val_loader, model, dev, dtype=dtype)
    return LMEvalResult(train_loss, val_loss, perplexity(train_loss), perplexity(val_loss),
                        len(train_loader), len(val_loader))


TRAINER_STATE_FILE = "trainer_state.json"
TRAINING_STATE_FILE = "training_state.pt"
LOSS_PLOT_FILE = "loss.png"


def pretrain(model: GPTModel, tokenizer: GPT2Tokenizer, text: str, out_dir: str | os.PathLike, *,
             epochs: int = 10, batch_size: int = 2, lr: float = 4e-4, weight_decay: float = 0.1,
             eval_freq: int = 5, eval_iter: int = 5, start_context: str = "Every effort moves you",
             stride: int | None = None, train_ratio: float = 0.9, seed: int = DEFAULT_SEED,
             precision: str = "auto", device: str | None = None, resume: bool = False,
             progress: bool = True) -> PretrainHistory:
    """Train `model` as a language model on `text` (the book's `train_model_simple` setup).

    After every epoch the weights (safetensors), config, history and optimizer/RNG state are
    written atomically to `out_dir`, with a loss plot; `resume=True` continues from there.
    """
    if epochs < 1 or eval_freq < 1 or eval_iter < 1 or batch_size < 1:
        raise ConfigError("epochs, eval_freq, eval_iter and batch_size must all be >= 1")
    out_dir = Path(out_dir)
    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev)
    torch.manual_seed(seed)
    train_loader, val_loader, data_rng = _lm_loaders(model, tokenizer, text, stride, batch_size, train_ratio, seed)
    model = model.to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    history = PretrainHistory()
    if resume:
        history = _restore_training(out_dir, model, optimizer, data_rng)
        if history.epochs_done >= epochs:
            log.info("%s already has %d epoch(s); nothing to do", out_dir, history.epochs_done)
            return history
        log.info("resuming after epoch %d (step %d)", history.epochs_done, history.global_step)

    settings = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                "eval_freq": eval_freq, "eval_iter": eval_iter,
                "stride": stride or min(model.context_length, MAX_LM_WINDOW),
                "train_ratio": train_ratio, "seed": seed, "precision": str(dtype).removeprefix("torch.")}

    def save(history: PretrainHistory) -> None:
        save_checkpoint(out_dir, model, tokenizer, pretraining=settings, epochs_done=history.epochs_done)
        # config.json, training_state.pt and trainer_state.json each record the epoch count;
        # resume checks they agree, so a crash between two writes cannot mix epochs.
        atomic_torch_save({"optimizer": optimizer.state_dict(), "data_rng": data_rng.get_state(),
                           "torch_rng": torch.get_rng_state(), "epochs_done": history.epochs_done},
                          out_dir / TRAINING_STATE_FILE)
        atomic_write_json(out_dir / TRAINER_STATE_FILE, history.to_dict())
        if history.track_tokens_seen:
            epochs_seen = torch.linspace(0, history.epochs_done, len(history.train_losses)).tolist()
            plot_values(epochs_seen, history.track_tokens_seen, history.train_losses, history.val_losses,
                        out_dir / LOSS_PLOT_FILE, label="loss", examples_label="Tokens seen")
        log.debug("checkpoint after epoch %d written to %s", history.epochs_done, out_dir)

    return train_model_simple(model, train_loader, val_loader, optimizer, dev, epochs, eval_freq, eval_iter,
                              start_context, tokenizer, dtype=dtype, history=history, on_epoch_end=save,
                              progress=progress)


def _restore_training(out_dir: Path, model: GPTModel, optimizer: torch.optim.Optimizer,
                      data_rng: torch.Generator) -> PretrainHistory:
    state_path, history_path = out_dir / TRAINING_STATE_FILE, out_dir / TRAINER_STATE_FILE
    if not state_path.is_file() or not history_path.is_file():
        raise CheckpointError(f"cannot resume: {out_dir} has no {TRAINING_STATE_FILE} / {TRAINER_STATE_FILE} "
                              "(run without --resume to start a new training run)")
    history = PretrainHistory(**json.loads(history_path.read_text(encoding="utf-8")))
    state = load_torch_file(state_path)
    config = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    if not (state.get("epochs_done") == history.epochs_done == config.get("epochs_done")):
        raise CheckpointError(f"cannot resume: the files in {out_dir} come from different epochs "
                              "(an interrupted write?); start a new run")
    load_state_dict_checked(model, read_tensor_file(out_dir / WEIGHTS_FILE), str(out_dir))
    optimizer.load_state_dict(state["optimizer"])
    data_rng.set_state(state["data_rng"])
    torch.set_rng_state(state["torch_rng"])
    return history
