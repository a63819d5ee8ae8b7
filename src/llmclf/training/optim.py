"""What both engines' training loops share: AdamW parameter groups, the learning-rate schedule,
the (weighted) classification loss and best-model selection. One definition each, so that an
option means the same in the scratch loop and under `transformers.Trainer`."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmclf.training.args import SELECT_BY, parse_class_weights

NORM_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d)


def _is_norm(module: nn.Module) -> bool:
    # llmclf's own LayerNorm/RMSNorm and transformers' (BertLayerNorm, LlamaRMSNorm, ...) by name
    return isinstance(module, NORM_TYPES) or "norm" in type(module).__name__.lower()


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Trainable parameters that get weight decay: weight matrices of everything but embeddings.
    Biases, norm weights and embeddings are not decayed (nanoGPT's and Trainer's rule)."""
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Embedding) or _is_norm(module):
            continue
        for param_name, p in module.named_parameters(recurse=False):
            if p.requires_grad and p.ndim >= 2:
                names.add(f"{module_name}.{param_name}" if module_name else param_name)
    return names


def adamw_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups over the trainable parameters: decayed weight matrices, and the rest."""
    decay = decay_parameter_names(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(adamw_param_groups(model, weight_decay), lr=lr)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based): linear warmup over
    `warmup_steps`, then constant, linear to 0 or cosine to 0 at `total_steps` (as Trainer's
    `get_*_schedule_with_warmup`)."""
    if step < warmup_steps:
        return step / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def warmup_steps(total_steps: int, warmup: float) -> int:
    return math.ceil(warmup * total_steps)


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup: float,
                   schedule: str) -> torch.optim.lr_scheduler.LambdaLR:
    n_warmup = warmup_steps(total_steps, warmup)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, n_warmup, schedule))


def class_weight_tensor(spec: str, label_ids: Iterable[int], n_classes: int) -> torch.Tensor | None:
    """Cross-entropy class weights for `--class-weights`: None for `none`; `balanced` is
    n_samples / (n_classes * count) per class (scikit-learn's `compute_class_weight`). Multi-label
    (`label_ids` are 0/1 rows): each label's BCE `pos_weight` (`llmclf.multilabel.pos_weights`)."""
    weights = parse_class_weights(spec, n_classes)
    if weights is None:
        return None
    label_ids = list(label_ids)
    if label_ids and isinstance(label_ids[0], list):
        import numpy as np

        from llmclf.multilabel import pos_weights

        return pos_weights(weights, np.asarray(label_ids))
    if weights == "balanced":
        counts = torch.bincount(torch.as_tensor(list(label_ids), dtype=torch.long), minlength=n_classes).double()
        weights = (counts.sum() / (n_classes * counts.clamp(min=1))).tolist()
    return torch.tensor(weights, dtype=torch.float32)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor | None = None,
                        reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy in float32, weighted per class when `class_weights` is given (then the mean is
    over the weights, as in `F.cross_entropy`). Labels given as 0/1 rows (multi-label): binary
    cross-entropy per label, `class_weights` as its `pos_weight` (`llmclf.multilabel.bce_loss`)."""
    if labels.ndim == 2:
        from llmclf.multilabel import bce_loss

        return bce_loss(logits, labels, class_weights, reduction)
    weight = class_weights.to(logits.device) if class_weights is not None else None
    return F.cross_entropy(logits.float(), labels.to(logits.device), weight=weight, reduction=reduction)


# --- best-model selection -----------------------------------------------------------------------

def metric_value(metrics: dict[str, Any], select_by: str) -> float:
    """The value of `--select-by` NAME in an evaluation's metrics (macro-f1 -> macro_f1)."""
    return float(metrics[select_by.replace("-", "_")])


def selection_key(metrics: dict[str, float], select_by: str) -> tuple[float, float]:
    """What `--select-by` maximises: (score, -loss); the loss breaks ties. `metrics` has
    accuracy, macro_f1 and loss (the validation metrics of one evaluation)."""
    if select_by not in SELECT_BY:
        raise ValueError(select_by)
    loss = float(metrics["loss"])
    score = -loss if select_by == "loss" else metric_value(metrics, select_by)
    return score, -loss


@dataclass
class Selection:
    """Best evaluation so far by `select_by`, and evaluations since it (for `--patience`)."""

    select_by: str
    best: dict[str, Any] | None = None  # metrics of the best evaluation, plus its "step" and "epoch"
    evals_without_gain: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def update(self, metrics: dict[str, Any]) -> bool:
        """Record one evaluation; True if it is the new best."""
        self.history.append(metrics)
        if self.best is None or selection_key(metrics, self.select_by) > selection_key(self.best, self.select_by):
            self.best = metrics
            self.evals_without_gain = 0
            return True
        self.evals_without_gain += 1
        return False

    def should_stop(self, patience: int | None) -> bool:
        return patience is not None and self.evals_without_gain >= patience

    def to_dict(self) -> dict[str, Any]:
        return {"select_by": self.select_by, "best": self.best, "evals_without_gain": self.evals_without_gain,
                "history": self.history}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Selection:
        return cls(d["select_by"], d["best"], d["evals_without_gain"], list(d["history"]))
