"""SmolLM2-135M spam-classifier recipes, and llmclf vs a plain `transformers` fine-tune.

On the course split (`llmclf data sms-spam --out DIR`: 1,045 / 149 / 300) this trains every recipe
given by --recipes with llmclf and chooses by validation accuracy (ties: lower validation loss);
test accuracy is printed for the record. Then it fine-tunes the same model with `transformers`
(`LlamaForSequenceClassification` from the same GGUF, the same trainable layers, dynamic padding,
AdamW, same epochs, batch size, lr and precision) and prints wall time and accuracy of both, with
the time ratio.

    python bench/bench_smollm2_recipes.py --data DIR [--recipes last-block:last:3:1e-4,...] [--hf-blocks 4]

A recipe is TRAINABLE:POOLING:EPOCHS:LR (e.g. last-n:4:mean:3:1e-4; `lora:16:16` style trainables work too).
"""

from __future__ import annotations

import argparse
import platform
import random
import time

import torch

from llmclf.classifier import TextClassifier
from llmclf.data.classification import label_order, read_labelled
from llmclf.runtime import autocast, resolve_precision

DEFAULT_RECIPES = ("last-block:last:3:1e-4,last-n:2:last:3:1e-4,last-n:4:last:3:1e-4,last-n:4:last:2:1e-4,"
                   "last-n:4:mean:3:1e-4,lora:last:3:5e-4,all:last:2:3e-5")


def parse_recipe(text: str) -> tuple[str, str, int, float]:
    *trainable, pooling, epochs, lr = text.split(":")
    return ":".join(trainable), pooling, int(epochs), float(lr)


def run_llmclf(data: dict, trainable: str, pooling: str, epochs: int, lr: float, batch_size: int,
               precision: str) -> dict:
    start = time.perf_counter()
    clf = TextClassifier("smollm2-135m", trainable=trainable, pooling=pooling, epochs=epochs, lr=lr,
                         batch_size=batch_size, precision=precision, eval_freq=10_000, bucket=True)
    clf.fit(data["train"], data["validation"], progress=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "val": clf.val_metrics_["accuracy"], "val_loss": clf.val_metrics_["loss"],
            "test": clf.evaluate(data["test"])["accuracy"]}


def run_transformers(data: dict, n_last_blocks: int, epochs: int, lr: float, batch_size: int, precision: str,
                     seed: int = 123) -> dict:
    """A hand-written transformers fine-tune: what one would write without llmclf."""
    from transformers import AutoTokenizer, DataCollatorWithPadding, LlamaForSequenceClassification

    from llmclf.loaders.llama import packaged_gguf

    start = time.perf_counter()
    path = packaged_gguf("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification.from_pretrained(str(path.parent), gguf_file=path.name, num_labels=2,
                                                           dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    for param in model.parameters():
        param.requires_grad = False
    for module in [*model.model.layers[-n_last_blocks:], model.model.norm, model.score]:
        module.requires_grad_(True)
    labels = label_order(data["train"].labels)
    collator = DataCollatorWithPadding(tokenizer)

    def batches(split: str, shuffle: bool, rng: random.Random):
        enc = tokenizer(data[split].texts, truncation=True, max_length=512)
        order = list(range(len(data[split].texts)))
        if shuffle:
            rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            batch = collator([{"input_ids": enc["input_ids"][j], "attention_mask": enc["attention_mask"][j]}
                              for j in idx])
            batch["labels"] = torch.tensor([labels.index(data[split].labels[j]) for j in idx])
            yield batch

    device = torch.device("cpu")
    dtype = resolve_precision(precision, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.1)
    rng = random.Random(seed)
    for _ in range(epochs):
        model.train()
        for batch in batches("train", True, rng):
            with autocast(device, dtype):
                loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    def accuracy(split: str) -> float:
        model.eval()
        correct = 0
        with torch.no_grad():
            for batch in batches(split, False, rng):
                with autocast(device, dtype):
                    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                correct += (logits.argmax(-1) == batch["labels"]).sum().item()
        return correct / len(data[split].texts)

    seconds = time.perf_counter() - start
    return {"seconds": seconds, "val": accuracy("validation"), "test": accuracy("test")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="directory with train.csv, validation.csv, test.csv")
    parser.add_argument("--recipes", default=DEFAULT_RECIPES, help="comma-separated TRAINABLE:POOLING:EPOCHS:LR")
    parser.add_argument("--hf-blocks", type=int, default=4, help="last N blocks trained in the side-by-side run")
    parser.add_argument("--hf-epochs", type=int, default=3)
    parser.add_argument("--hf-lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args()
    data = {s: read_labelled(f"{args.data}/{s}.csv") for s in ("train", "validation", "test")}
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"precision {args.precision}; split {len(data['train'])}/{len(data['validation'])}/{len(data['test'])}")
    print(f"{'implementation':14s} {'trainable':12s} {'pooling':8s} {'ep':>3s} {'lr':>7s} {'time s':>7s} "
          f"{'val acc':>8s} {'test acc':>8s}", flush=True)
    results = []
    for text in args.recipes.split(","):
        trainable, pooling, epochs, lr = parse_recipe(text)
        r = run_llmclf(data, trainable, pooling, epochs, lr, args.batch_size, args.precision)
        results.append((text, r))
        print(f"{'llmclf':14s} {trainable:12s} {pooling:8s} {epochs:3d} {lr:7.0e} {r['seconds']:7.1f} "
              f"{r['val'] * 100:7.2f}% {r['test'] * 100:7.2f}%", flush=True)
    best_text, best = max(results, key=lambda item: (item[1]["val"], -item[1]["val_loss"]))
    print(f"chosen by validation accuracy, then validation loss: {best_text} (test {best['test'] * 100:.2f}%)")
    if args.skip_hf:
        return
    trainable = "last-block" if args.hf_blocks == 1 else f"last-n:{args.hf_blocks}"
    ours = run_llmclf(data, trainable, "last", args.hf_epochs, args.hf_lr, args.batch_size, args.precision)
    theirs = run_transformers(data, args.hf_blocks, args.hf_epochs, args.hf_lr, args.batch_size, args.precision)
    for name, r in (("llmclf", ours), ("transformers", theirs)):
        print(f"{name:14s} {trainable:12s} {'last':8s} {args.hf_epochs:3d} {args.hf_lr:7.0e} {r['seconds']:7.1f} "
              f"{r['val'] * 100:7.2f}% {r['test'] * 100:7.2f}%", flush=True)
    print(f"llmclf is {theirs['seconds'] / ours['seconds']:.2f}x faster than transformers at equal trainable layers")


if __name__ == "__main__":
    main()
