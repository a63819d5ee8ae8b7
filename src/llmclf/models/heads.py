"""Turning a language model into a classifier: a class head, pooling, trainable layers, LoRA."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from llmclf.errors import ConfigError
from llmclf.models.decoder import rows_at
from llmclf.models.gpt2 import GPTModel

POOLINGS = ("last", "mean", "mean-blocks", "last-position")
MEAN_POOLINGS = ("mean", "mean-blocks")


def replace_head(model: GPTModel, num_classes: int, bias: bool = True) -> GPTModel:
    """The book's step 1: `out_head` becomes `Linear(emb_dim, num_classes)` (with bias, as the book's;
    without, as Transformers' `*ForSequenceClassification.score`, for an exact `llmclf export --format hf`)."""
    model.out_head = nn.Linear(model.cfg.emb_dim, num_classes, bias=bias)
    return model


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str,
         skip: int = 0) -> torch.Tensor:
    """One vector (B, C) per sequence from hidden states (B, T, C).

    `last`: the last real token (found through the mask, so any padding side works);
    `mean`: the mean over real tokens but the first `skip` of each (a template's before the text);
    `last-position`: the course's `[:, -1, :]`. (`mean-blocks` is `mean` of several blocks' states,
    averaged: `SequenceClassifier` does that.)
    """
    if pooling == "last-position" or attention_mask is None:
        return hidden[:, -1, :]
    if pooling in MEAN_POOLINGS:
        attention_mask = without_first(attention_mask, skip)
    mask = attention_mask.to(hidden.dtype)
    if pooling in MEAN_POOLINGS:
        return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    if pooling == "last":
        return rows_at(hidden, last_positions(attention_mask, pooling, *hidden.shape[:2], hidden.device))[:, 0]
    raise ConfigError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")


def without_first(attention_mask: torch.Tensor, skip: int) -> torch.Tensor:
    """`attention_mask` (B, T) without the first `skip` real tokens of each row (any padding side); a row
    with no more keeps its real tokens."""
    if not skip:
        return attention_mask
    real = attention_mask.bool()
    kept = real & (attention_mask.long().cumsum(1) > skip)  # the rank of each real token in its row, from 1
    kept = kept | (real & ~kept.any(1, keepdim=True))  # (logical ops, not `where`: ONNX Runtime has no bool Where)
    return kept.to(attention_mask.dtype)


def last_positions(attention_mask: torch.Tensor | None, pooling: str, batch: int, length: int,
                   device: torch.device) -> torch.Tensor:
    """(B,) index of the position that `last` or `last-position` pooling reads."""
    if pooling == "last-position" or attention_mask is None:
        return torch.full((batch,), length - 1, dtype=torch.long, device=device)
    positions = torch.arange(length, device=device)
    return (positions * attention_mask.to(device).long()).argmax(dim=1)  # index of the last real token


class SequenceClassifier(nn.Module):
    """A `GPTModel` whose `out_head` maps to classes, read at one pooled position per text.

    `forward(input_ids, attention_mask)` -> class logits (B, num_classes). The backbone keeps the
    book's parameter names, so its state_dict is the book's classifier checkpoint.

    Pooling `mean-blocks` reads more than the last block: the head gets the mean over the blocks from a
    third of the depth on of each block's states, final-normed and mean-pooled over the real tokens
    (middle blocks carry features that transfer better than the last block's, which is shaped for
    predicting the next token: docs/measurements.md, "Which tokens and blocks to pool").
    `prefix_tokens`: the tokens a template puts before the text, which mean poolings leave out: a causal
    model's states there cannot depend on the text, so they would only dilute it, most in short texts.
    """

    def __init__(self, backbone: GPTModel, pooling: str = "last", prefix_tokens: int = 0) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
        self.backbone = backbone
        self.pooling = pooling
        self.prefix_tokens = prefix_tokens

    @property
    def num_classes(self) -> int:
        return self.backbone.out_head.out_features

    @property
    def pooled_blocks(self) -> range:
        """The blocks whose output states the head reads."""
        n_layers = len(self.backbone.trf_blocks)
        return range(n_layers // 3 if self.pooling == "mean-blocks" else n_layers - 1, n_layers)

    @property
    def features_start(self) -> int:
        """The `start` that says the inputs are already what the head reads: one pooled, normed vector per
        text (B, 1, C), cached for a head trained alone."""
        return len(self.backbone.trf_blocks) + 1

    def cache_point(self, first_trainable: int) -> int:
        """Where a frozen pass can stop and be cached when blocks before `first_trainable` are frozen: the
        head's features when nothing but the head trains, else the trainable block's input (with
        `mean-blocks`, no later than the first block the head reads). 0: nothing to cache."""
        if first_trainable >= len(self.backbone.trf_blocks):
            return self.features_start
        return min(first_trainable, self.pooled_blocks.start)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                start: int | None = None) -> torch.Tensor:
        """Class logits of token ids; with `start`, `input_ids` are instead cached hidden states after
        block `start - 1` (see `forward_from`; through `forward` so that DDP sees the call)."""
        if start is not None:
            return self.forward_from(input_ids, attention_mask, start=start)
        if self.pooling == "last-position":
            attention_mask = None  # the course attends to its padding tokens; reproduce that
        x, mask = self.backbone.embed(input_ids, attention_mask)
        return self.forward_from(x, attention_mask, mask, start=0)

    def forward_from(self, x: torch.Tensor, attention_mask: torch.Tensor | None, mask: torch.Tensor | None = None,
                     start: int = 0) -> torch.Tensor:
        """Run blocks `start:` on hidden states x (B, T, C), then norm, pool and head; with `start` =
        `features_start`, x is the pooled features (B, 1, C) and only the head runs.

        With a one-position pooling (`last`, `last-position`) the last block finishes only the
        pooled row after its attention: the head never reads the others.
        """
        if start >= self.features_start:
            return self.backbone.out_head(x[:, 0])
        return self.backbone.out_head(self.features(x, attention_mask, mask, start))

    def features(self, x: torch.Tensor, attention_mask: torch.Tensor | None, mask: torch.Tensor | None,
                 start: int) -> torch.Tensor:
        """What the head reads (B, C), from hidden states x after block `start - 1`."""
        if mask is None:
            mask = self.backbone.attention_inputs(attention_mask, x.shape[1])
        blocks, backbone = self.pooled_blocks, self.backbone
        if self.pooling == "mean-blocks":
            return self._block_mean(x, attention_mask, mask, start)[0]
        if self.pooling == "mean" or start >= blocks.stop:
            x = backbone.run_blocks(x, mask, start=start)
            return pool(backbone.final_norm(x), attention_mask, self.pooling, self.prefix_tokens)
        x = backbone.run_blocks(x, mask, start=start, stop=blocks.start)
        pooled_at = last_positions(attention_mask, self.pooling, *x.shape[:2], x.device)
        x = backbone.trf_blocks[-1](x, mask, only_at=pooled_at)  # (B, 1, C)
        return backbone.final_norm(x[:, 0])

    def _block_mean(self, x: torch.Tensor, attention_mask: torch.Tensor | None, mask: Any, start: int,
                    keep: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`mean-blocks` features (B, C) from hidden states x after block `start - 1`, and (with `keep`)
        the states after block `keep - 1`, met on the way."""
        blocks, backbone = self.pooled_blocks, self.backbone
        if start > blocks.start:
            raise ValueError(f"mean-blocks pooling reads blocks {blocks.start + 1}-{blocks.stop}; states cached "
                             f"after block {start} miss some of them")
        total, kept = torch.zeros((), dtype=x.dtype, device=x.device), None
        for layer in range(start, blocks.stop):
            if layer == keep:
                kept = x
            x = backbone.run_blocks(x, mask, start=layer, stop=layer + 1)
            if layer >= blocks.start:
                total = total + pool(backbone.final_norm(x), attention_mask, "mean", self.prefix_tokens)
        return total / len(blocks), x if keep == blocks.stop else kept

    @torch.no_grad()
    def prefix_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, stop: int) -> torch.Tensor:
        """Hidden states (B, T, C) after the embedding and blocks `:stop` (for caching frozen layers); with
        `stop` = `features_start`, the head's features (B, 1, C)."""
        x, mask = self.backbone.embed(input_ids, attention_mask)
        if stop >= self.features_start:
            return self.features(x, attention_mask, mask, 0)[:, None]
        return self.backbone.run_blocks(x, mask, stop=stop)

    @torch.no_grad()
    def states_and_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                            stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The hidden states (B, T, C) after blocks `:stop` and the head's features (B, 1, C), from one pass
        (`stop` may lie among the blocks `mean-blocks` reads)."""
        x, mask = self.backbone.embed(input_ids, attention_mask)
        if self.pooling == "mean-blocks" and stop > self.pooled_blocks.start:
            features, states = self._block_mean(x, attention_mask, mask, 0, keep=stop)
            assert states is not None
        else:
            states = self.backbone.run_blocks(x, mask, stop=stop)
            features = self.features(states, attention_mask, mask, stop)
        return states, features[:, None]


class LoRALayer(nn.Module):
    """The book's appendix-E low-rank update x @ A @ B, scaled by alpha / rank."""

    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(in_dim, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(rank, out_dim))  # zero: training starts at the base model
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaling * (x @ self.A @ self.B)


class LinearWithLoRA(nn.Module):
    def __init__(self, linear: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.linear = linear
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.lora(x)

    def merged(self) -> nn.Linear:
        """A plain Linear with the update folded into its weight (for saving and inference)."""
        with torch.no_grad():
            self.linear.weight += (self.lora.scaling * (self.lora.A @ self.lora.B)).T.to(self.linear.weight.dtype)
        return self.linear


def replace_linear_with_lora(module: nn.Module, rank: int, alpha: float) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, LinearWithLoRA(child, rank, alpha))
        else:
            replace_linear_with_lora(child, rank, alpha)


def merge_lora(module: nn.Module) -> None:
    """Fold every LoRA update into its Linear layer, restoring the plain module tree."""
    for name, child in module.named_children():
        if isinstance(child, LinearWithLoRA):
            setattr(module, name, child.merged())
        else:
            merge_lora(child)


@dataclass(frozen=True)
class Trainable:
    """A parsed `--trainable` value: what trains, and from which block everything is frozen."""

    kind: str  # head | last-n | all | lora
    n_blocks: int = 0
    rank: int = 16
    alpha: float = 16.0

    @classmethod
    def parse(cls, spec: str) -> Trainable:
        if spec in ("head", "all"):
            return cls(spec)
        if spec == "last-block":
            return cls("last-n", 1)
        if m := re.fullmatch(r"last-n:(\d+)", spec):
            return cls("last-n", int(m.group(1)))
        if m := re.fullmatch(r"lora(?::(\d+)(?::(\d+(?:\.\d+)?))?)?", spec):
            rank = int(m.group(1) or 16)
            return cls("lora", rank=rank, alpha=float(m.group(2) or rank))
        raise ConfigError(f"unknown --trainable {spec!r}; use head, last-block, last-n:N, all, or lora[:rank[:alpha]]")

    def first_trainable_block(self, n_layers: int) -> int:
        """Blocks before this index are frozen (their outputs can be cached)."""
        if self.kind == "head":
            return n_layers
        if self.kind == "last-n":
            return max(n_layers - self.n_blocks, 0)
        return 0


def apply_trainable(classifier: SequenceClassifier, trainable: Trainable) -> int:
    """Freeze everything, then unfreeze what `trainable` says. Returns the trainable parameter count.

    `last-n:N` trains the last N blocks, the final norm and the head (`last-block` is the course's
    choice); `lora` adds rank-r adapters to every Linear layer of the blocks and trains them and the head.
    """
    backbone = classifier.backbone
    if trainable.kind == "lora":
        replace_linear_with_lora(backbone.trf_blocks, trainable.rank, trainable.alpha)
    for param in classifier.parameters():
        param.requires_grad = trainable.kind == "all"
    backbone.out_head.requires_grad_(True)
    if trainable.kind == "last-n":
        first = trainable.first_trainable_block(len(backbone.trf_blocks))
        for block in list(backbone.trf_blocks)[first:]:
            block.requires_grad_(True)
        backbone.final_norm.requires_grad_(True)
    if trainable.kind == "lora":
        for module in backbone.modules():
            if isinstance(module, LoRALayer):
                module.requires_grad_(True)
    return sum(p.numel() for p in classifier.parameters() if p.requires_grad)
