"""llmclf's Transformers engine against a plain `transformers` Trainer script, same settings.

Fine-tunes the packaged all-MiniLM-L6-v2 on the SMS spam course split (1,045 / 149 / 300, as
written by `llmclf data sms-spam`) with the course's Trainer settings (5 epochs, batch 8, lr 5e-5,
weight decay 0.005, 10 % warmup, gradient accumulation 4, evaluation every 50 steps, best model by
F1), each run in a fresh process, and prints wall time and test accuracy/F1 of each:

- `plain`: the hand-written script below (what the course does), float32. Like any such script
  with current transformers, it trains with gradient accumulation on a loss 4 times too large
  (huggingface/transformers#47688), which llmclf corrects; it also decays the embeddings and picks
  the best evaluation by binary F1, where llmclf decays weight matrices only and selects by
  macro-F1 (ties to the lower loss, as its scratch engine); times are comparable, accuracies may differ;
- `llmclf-fp32`: `HFClassifier` with the same settings, float32 (the overhead comparison);
- `llmclf-auto`: `HFClassifier` with llmclf's default precision (bf16 on AMX CPUs).

    python bench/bench_hf_engine.py [--data DIR] [--runs plain,llmclf-fp32,llmclf-auto]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {"epochs": 5, "batch_size": 8, "lr": 5e-5, "weight_decay": 0.005, "warmup": 0.1, "grad_accum": 4,
            "eval_freq": 50, "seed": 42}


def run_plain(data: Path, out: Path) -> dict:
    """The course's way: tokenizer + AutoModelForSequenceClassification + Trainer, by hand."""
    import math

    import numpy as np
    import pandas as pd
    import torch
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from llmclf.loaders.encoders import resolve_hf_model

    model_dir = resolve_hf_model("all-minilm-l6-v2")
    frames = {name: pd.read_csv(data / f"{name}.csv") for name in ("train", "validation", "test")}
    labels = sorted(frames["train"]["label"].unique())
    label2id = {label: i for i, label in enumerate(labels)}
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    set_seed(SETTINGS["seed"])
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label2id)

    class TextDataset(torch.utils.data.Dataset):
        def __init__(self, frame):
            self.enc = tokenizer(frame["text"].tolist(), truncation=True)
            self.labels = [label2id[label] for label in frame["label"]]

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return {**{k: v[i] for k, v in self.enc.items()}, "labels": self.labels[i]}

    def compute_metrics(eval_pred):
        logits, y = eval_pred
        preds = np.argmax(logits, axis=-1)
        p, r, f1, _ = precision_recall_fscore_support(y, preds, average="binary")
        return {"accuracy": accuracy_score(y, preds), "precision": p, "recall": r, "f1": f1}

    train, val, test = (TextDataset(frames[n]) for n in ("train", "validation", "test"))
    steps = math.ceil(math.ceil(len(train) / SETTINGS["batch_size"]) / SETTINGS["grad_accum"]) * SETTINGS["epochs"]
    args = TrainingArguments(
        output_dir=str(out), num_train_epochs=SETTINGS["epochs"], per_device_train_batch_size=SETTINGS["batch_size"],
        per_device_eval_batch_size=SETTINGS["batch_size"], learning_rate=SETTINGS["lr"],
        weight_decay=SETTINGS["weight_decay"], warmup_steps=math.ceil(SETTINGS["warmup"] * steps),
        gradient_accumulation_steps=SETTINGS["grad_accum"], eval_strategy="steps", eval_steps=SETTINGS["eval_freq"],
        save_strategy="steps", save_steps=SETTINGS["eval_freq"], load_best_model_at_end=True,
        metric_for_best_model="f1", seed=SETTINGS["seed"], report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val,
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=compute_metrics)
    trainer.train()
    trainer.save_model(str(out / "final"))
    scores = trainer.evaluate(test, metric_key_prefix="test")
    return {"accuracy": scores["test_accuracy"], "f1": scores["test_f1"]}


def run_llmclf(data: Path, out: Path, precision: str) -> dict:
    from llmclf.classifier import make_classifier
    from llmclf.data.classification import read_labelled

    clf = make_classifier("all-minilm-l6-v2", precision=precision, select_by="macro-f1", **SETTINGS)
    clf.fit(read_labelled(data / "train.csv"), read_labelled(data / "validation.csv"), out_dir=out, progress=False)
    test = clf.evaluate(read_labelled(data / "test.csv"))
    return {"accuracy": test["accuracy"], "f1": test["per_class"][clf.classes_[1]]["f1"]}


def child(name: str, data: Path) -> None:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        if name == "plain":
            result = run_plain(data, Path(out))
        else:
            result = run_llmclf(data, Path(out), "float32" if name == "llmclf-fp32" else "auto")
        result["seconds"] = time.perf_counter() - start
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("runs/demo/sms"),
                        help="directory with train/validation/test.csv (llmclf data sms-spam --out DIR)")
    parser.add_argument("--runs", default="plain,llmclf-fp32,llmclf-auto")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.data)
        return
    if not (args.data / "train.csv").is_file():
        sys.exit(f"{args.data}/train.csv not found: run `llmclf data sms-spam --out {args.data}` first")
    print(f"all-MiniLM-L6-v2 on {args.data}; settings {SETTINGS}; torch threads {os.cpu_count()}")
    rows = {}
    for name in args.runs.split(","):
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--child", name, "--data", str(args.data)],
                              capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        line = next((s for s in proc.stdout.splitlines() if s.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        rows[name] = {**json.loads(line[7:]), "process_seconds": time.perf_counter() - started}
        r = rows[name]
        print(f"{name:12s} train+test {r['seconds']:7.1f} s (process {r['process_seconds']:6.1f} s)  "
              f"test accuracy {r['accuracy'] * 100:6.2f}%  F1 {r['f1']:.4f}", flush=True)
    if "plain" in rows:
        for name in rows:
            if name != "plain":
                print(f"time ratio plain / {name}: {rows['plain']['seconds'] / rows[name]['seconds']:.2f}x")


if __name__ == "__main__":
    main()
