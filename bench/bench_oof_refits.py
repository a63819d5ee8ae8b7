"""The cost of the out-of-fold head refits (`--ensemble-folds 5`) at SMS size, without a backbone: 1,045
training / 149 validation texts as random pooled 576-dim vectors (SmolLM2-135M's width), the default
recipe's options (7 epochs, batch 8, AdamW 1e-3, bfloat16 autocast), 5 stratified folds.

    python bench/bench_oof_refits.py
"""

from __future__ import annotations

import time

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold

from llmclf.config import GPTConfig
from llmclf.data.classification import EncodedTexts
from llmclf.models.gpt2 import GPTModel
from llmclf.models.heads import SequenceClassifier, Trainable, apply_trainable, replace_head
from llmclf.training.args import TrainArgs
from llmclf.training.classifier import Batches, ClassifierTraining, all_logits


def pooled_batches(n: int, rng: np.random.Generator) -> Batches:
    """`n` texts as `Batches.pooled` gives them: one (1, 576) vector each, labels 0/1."""
    labels = rng.integers(0, 2, n).tolist()
    batches = Batches.__new__(Batches)
    batches.data, batches.batch_size, batches.pad_id = EncodedTexts([[0]] * n, labels, 0), 8, 0
    batches.fixed_length, batches.device, batches.bucket = None, torch.device("cpu"), False
    batches.cache_from, batches.dtype, batches.lengths = 1, torch.bfloat16, [1] * n
    batches.states = [torch.randn(1, 576) + (2 * y - 1) * 0.1 for y in labels]
    return batches


def main() -> None:
    torch.manual_seed(0)
    backbone = GPTModel(GPTConfig(vocab_size=100, context_length=8, emb_dim=576, n_heads=4, n_layers=1,
                                  drop_rate=0.0))
    replace_head(backbone, 2)
    model = SequenceClassifier(backbone, "mean")
    apply_trainable(model, Trainable.parse("head"))
    backbone.final_norm = torch.nn.Identity()  # as in TextClassifier._refit_head
    rng = np.random.default_rng(0)
    train, val = pooled_batches(1045, rng), pooled_batches(149, rng)
    args = TrainArgs.for_engine("scratch", log_every=10_000)
    y = np.array(train.data.labels)
    start = time.perf_counter()
    for fit, held in StratifiedKFold(5, shuffle=True, random_state=123).split(y, y):
        replace_head(backbone, 2)
        ClassifierTraining(model, train.subset(fit.tolist()), val, args, progress=False, say=lambda _: None).run()
        all_logits(model, train.subset(held.tolist(), bucket=False))
    print(f"5 folds x {args.epochs} epochs of head refits (1,045 / 149 texts, 576-dim vectors): "
          f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
