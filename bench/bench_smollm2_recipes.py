"""SmolLM2-135M spam-classifier recipes, and llmclf vs a plain `transformers` fine-tune.

On the course split (`llmclf data sms-spam --out DIR`: 1,045 / 149 / 300):

1. Selection. Every recipe in --recipes is scored on validation data only. With --folds K (default
   5): K-fold cross-validated accuracy on train + validation (1,194 texts; the frozen layers are run
   once per text and shared by all folds), after every epoch up to the recipe's. 149 validation
   texts alone cannot separate recipes (one error = 0.67 %). --folds 0: train on train, score on
   validation. The best (recipe, epochs) wins; ties go to fewer epochs, then to the earlier recipe.
2. The chosen recipe is trained as `llmclf train` does (train, best epoch by validation accuracy)
   and its test accuracy is printed, once.
3. Side by side: the same model with the same trainable layers, template, epochs, batch size and lr,
   fine-tuned with `transformers` (`LlamaForSequenceClassification` from the same GGUF, dynamic
   padding, AdamW), as one would write it without llmclf. Wall time and accuracy of both, and the
   time ratio. Each time includes model loading; neither includes the test evaluation.

    python bench/bench_smollm2_recipes.py --data DIR [--recipes ...] [--folds 5] [--template chat]
    python bench/bench_smollm2_recipes.py --data DIR --compare last-n:2:last:6:1e-4   # skip selection

A recipe is TRAINABLE:POOLING:EPOCHS:LR (e.g. last-n:4:mean:6:1e-4). Cross-validation takes
head / last-block / last-n:N recipes; with --folds 0, `lora[:r[:a]]` and `all` work too.
"""

from __future__ import annotations

import argparse
import platform
import random
import time

import torch

from llmclf.classifier import TextClassifier
from llmclf.data.classification import apply_template, label_order, read_labelled
from llmclf.models.heads import Trainable

# The SMS instruction in SmolLM2-Instruct's chat format (ChatML), without its default system prompt.
TEMPLATES = {
    "none": None,
    "chat": "<|im_start|>user\nIs the following SMS spam?\n{text}<|im_end|>\n<|im_start|>assistant\n",
}
DEFAULT_RECIPES = "last-block:last:8:1e-4,last-n:2:last:8:1e-4,last-n:4:last:8:1e-4,last-n:2:mean:8:1e-4"


def parse_recipe(text: str) -> tuple[str, str, int, float]:
    *trainable, pooling, epochs, lr = text.split(":")
    return ":".join(trainable), pooling, int(epochs), float(lr)


def run_llmclf(data: dict, trainable: str, pooling: str, epochs: int, lr: float, batch_size: int,
               precision: str, template: str | None) -> dict:
    start = time.perf_counter()
    clf = TextClassifier("smollm2-135m", trainable=trainable, pooling=pooling, epochs=epochs, lr=lr,
                         batch_size=batch_size, precision=precision, log_every=10_000, bucket=True,
                         template=template)
    clf.fit(data["train"], data["validation"], progress=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "val": clf.val_metrics_["accuracy"], "val_loss": clf.val_metrics_["loss"],
            "best_epoch": clf.history_.best_epoch, "test": clf.evaluate(data["test"])["accuracy"]}


def cross_validate(data: dict, recipes: list[str], folds: int, batch_size: int, precision: str,
                   template: str | None, seed: int = 0) -> dict[str, list[float]]:
    """Recipe -> K-fold accuracy on train + validation after each epoch (constant lr, so the
    first E epochs of a longer run are exactly an E-epoch run)."""
    from sklearn.model_selection import StratifiedKFold

    from llmclf.data.classification import encode_texts
    from llmclf.loaders.spec import load_model
    from llmclf.models.heads import SequenceClassifier, apply_trainable, replace_head
    from llmclf.runtime import resolve_precision
    from llmclf.training.args import TrainArgs
    from llmclf.training.classifier import Batches, train_classifier

    texts = data["train"].texts + data["validation"].texts
    names = data["train"].labels + data["validation"].labels
    classes = label_order(names)
    labels = [classes.index(name) for name in names]
    texts = apply_template(template, texts)
    backbone, tokenizer = load_model("smollm2-135m")
    torch.manual_seed(123)
    replace_head(backbone, len(classes))
    initial = {name: t.clone() for name, t in backbone.state_dict().items()}
    n_layers = len(backbone.trf_blocks)
    encoded = encode_texts(texts, tokenizer, backbone.context_length, labels)
    device = torch.device("cpu")
    dtype = resolve_precision(precision, device)
    splits = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(texts, labels))
    cached: dict[int, Batches] = {}
    scores = {}
    for recipe in recipes:
        trainable_spec, pooling, epochs, lr = parse_recipe(recipe)
        trainable = Trainable.parse(trainable_spec)
        if trainable.kind not in ("head", "last-n") or pooling == "last-position":
            raise SystemExit(f"{recipe}: cross-validation takes head/last-block/last-n:N with last or mean pooling; "
                             "use --folds 0")
        classifier = SequenceClassifier(backbone, pooling)
        first = trainable.first_trainable_block(n_layers)
        if first not in cached:  # frozen layers once per text, shared by every fold
            cached[first] = Batches(classifier, encoded, batch_size, tokenizer.pad_id, None, device, dtype,
                                    cache_from=first or None)
        start, correct = time.perf_counter(), [0] * epochs
        for train_idx, held_idx in splits:
            backbone.load_state_dict(initial)
            apply_trainable(classifier, trainable)
            history = train_classifier(
                classifier, cached[first].subset(list(train_idx), bucket=True),
                cached[first].subset(list(held_idx), bucket=False),
                TrainArgs.for_engine("scratch", epochs=epochs, lr=lr, log_every=10**9, eval_iter=1),
                progress=False, say=lambda _: None)
            for epoch, accuracy in enumerate(history.val_accuracy_full):
                correct[epoch] += round(accuracy * len(held_idx))
        scores[recipe] = [c / len(texts) for c in correct]
        print(f"{recipe:24s} {time.perf_counter() - start:6.0f} s  errors after each epoch: "
              f"{' '.join(str(len(texts) - c) for c in correct)}  (of {len(texts)})", flush=True)
    return scores


def run_transformers(data: dict, n_last_blocks: int, epochs: int, lr: float, batch_size: int, precision: str,
                     template: str | None, seed: int = 123) -> dict:
    """A hand-written transformers fine-tune: what one would write without llmclf."""
    from transformers import AutoTokenizer, DataCollatorWithPadding, LlamaForSequenceClassification

    from llmclf.families import packaged_path
    from llmclf.runtime import autocast, resolve_precision

    start = time.perf_counter()
    path = packaged_path("smollm2-135m")
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
        texts = apply_template(template, data[split].texts)
        enc = tokenizer(texts, truncation=True, max_length=512)
        order = list(range(len(texts)))
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
    seconds = time.perf_counter() - start

    def accuracy(split: str) -> float:
        model.eval()
        correct = 0
        with torch.no_grad():
            for batch in batches(split, False, rng):
                with autocast(device, dtype):
                    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                correct += (logits.argmax(-1) == batch["labels"]).sum().item()
        return correct / len(data[split].texts)

    return {"seconds": seconds, "val": accuracy("validation"), "test": accuracy("test")}


def select(data: dict, recipes: list[str], folds: int, batch_size: int, precision: str,
           template: str | None) -> tuple[str, dict | None]:
    """The recipe (with its epoch count) that scores best on validation data, and its llmclf run
    when selection already trained it (--folds 0)."""
    if folds:
        scores = cross_validate(data, recipes, folds, batch_size, precision, template)
        candidates = [(accuracy, -epoch, -rank, recipe, epoch)
                      for rank, recipe in enumerate(recipes)
                      for epoch, accuracy in enumerate(scores[recipe], start=1)]
        accuracy, _, _, recipe, epochs = max(candidates)
        trainable, pooling, _, lr = parse_recipe(recipe)
        chosen = f"{trainable}:{pooling}:{epochs}:{lr:g}"
        print(f"chosen by {folds}-fold accuracy on train + validation: {chosen} ({accuracy * 100:.2f} %)")
        return chosen, None
    results = []
    for recipe in recipes:
        r = run_llmclf(data, *parse_recipe(recipe), batch_size, precision, template)
        results.append((recipe, r))
        print(f"{recipe:24s} {r['seconds']:6.0f} s  validation {r['val'] * 100:.2f} % (loss {r['val_loss']:.4f})",
              flush=True)
    chosen, result = max(results, key=lambda item: (item[1]["val"], -item[1]["val_loss"]))
    print(f"chosen by validation accuracy, then validation loss: {chosen}")
    return chosen, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="directory with train.csv, validation.csv, test.csv")
    parser.add_argument("--recipes", default=DEFAULT_RECIPES, help="comma-separated TRAINABLE:POOLING:EPOCHS:LR")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds for selection (0: validation set)")
    parser.add_argument("--template", choices=sorted(TEMPLATES), default="chat",
                        help="what the model reads per text (chat: an instruction in SmolLM2's chat format)")
    parser.add_argument("--compare", help="skip selection: compare this recipe with transformers")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--skip-hf", action="store_true", help="no transformers run")
    args = parser.parse_args()
    data = {s: read_labelled(f"{args.data}/{s}.csv") for s in ("train", "validation", "test")}
    template = TEMPLATES[args.template]
    print(f"machine: {platform.machine()} {platform.processor()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; precision {args.precision}; template {args.template}; "
          f"split {len(data['train'])}/{len(data['validation'])}/{len(data['test'])}", flush=True)
    chosen, ours = (args.compare, None) if args.compare else select(
        data, args.recipes.split(","), args.folds, args.batch_size, args.precision, template)
    trainable, pooling, epochs, lr = parse_recipe(chosen)
    ours = ours or run_llmclf(data, trainable, pooling, epochs, lr, args.batch_size, args.precision, template)
    rows = [("llmclf", ours)]
    if not args.skip_hf:
        spec = Trainable.parse(trainable)
        if spec.kind != "last-n" or pooling != "last":
            raise SystemExit(f"{chosen}: the transformers run takes last-block/last-n:N with last pooling")
        rows.append(("transformers", run_transformers(data, spec.n_blocks, epochs, lr, args.batch_size,
                                                      args.precision, template)))
    print(f"{'implementation':14s} {'trainable':12s} {'pooling':8s} {'ep':>3s} {'lr':>7s} {'time s':>7s} "
          f"{'val acc':>8s} {'test acc':>8s}")
    for name, r in rows:
        print(f"{name:14s} {trainable:12s} {pooling:8s} {epochs:3d} {lr:7.0e} {r['seconds']:7.1f} "
              f"{r['val'] * 100:7.2f}% {r['test'] * 100:7.2f}%")
    if len(rows) == 2:
        print(f"llmclf is {rows[1][1]['seconds'] / ours['seconds']:.2f}x faster than transformers "
              "at equal trainable layers")


if __name__ == "__main__":
    main()
