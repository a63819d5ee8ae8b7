"""The training loop's options and its resume, measured with the demo recipe (SmolLM2-135M, SMS
instruction template, last 2 blocks + final norm + head, last-token pooling, batch 8, lr 1e-4).

    python bench/bench_training_loop.py options --data runs/demo/sms        # course split, 6 epochs
    python bench/bench_training_loop.py imbalanced --data runs/sms-all      # `data sms-spam --no-balance`
    python bench/bench_training_loop.py resume --data runs/demo/sms --work runs/bench-resume

`options`: constant vs linear-with-10 %-warmup vs cosine-with-10 %-warmup learning rate, each
without and with gradient clipping (max norm 1.0). The frozen layers run once per text and are
shared by every variant; each variant starts from the same head and block weights. The best
epoch is chosen on validation (as `llmclf train` does); test figures are printed beside it, not
used to choose.

`imbalanced`: all 5,574 messages (70/10/20, 13 % spam), `--class-weights none` vs `balanced`:
macro-F1 and spam recall on validation and test, through `make_classifier(...).fit` (default
all-MiniLM-L6-v2 on the hf engine; SmolLM2's frozen pass over 5,574 texts alone takes about half
an hour on 2 older cores; `--model smollm2-135m` runs it). The README's figures used
`--epochs 1 --batch-size 32 --max-length 64`.

`resume`: `llmclf train` with the demo's arguments, once uninterrupted and once killed with
SIGKILL as soon as the training state of epoch --kill-after-epoch is on disk, then resumed with
--resume. Prints both wall times (total for the killed + resumed run), the size of one training
state, and whether the two final models are identical.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

SMS_TEMPLATE = "<|im_start|>user\nIs the following SMS spam?\n{text}<|im_end|>\n<|im_start|>assistant\n"
DEMO = {"trainable": "last-n:2", "pooling": "last", "epochs": 6, "lr": 1e-4, "batch_size": 8, "bucket": True}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


class Prepared:
    """SmolLM2 with a new head, the demo's trainable layers, and cached batches of each split."""

    def __init__(self, data_dir: Path, precision: str = "auto", seed: int = 123) -> None:
        from llmclf.data.classification import apply_template, encode_texts, label_order, read_labelled
        from llmclf.loaders.spec import load_model
        from llmclf.models.heads import SequenceClassifier, Trainable, apply_trainable, replace_head
        from llmclf.runtime import resolve_precision
        from llmclf.training.classifier import Batches

        start = time.perf_counter()
        self.data = {s: read_labelled(data_dir / f"{s}.csv") for s in ("train", "validation", "test")}
        self.classes = label_order(self.data["train"].labels)
        backbone, tokenizer = load_model("smollm2-135m")
        torch.manual_seed(seed)  # as TextClassifier.fit: the head's init
        replace_head(backbone, len(self.classes))
        self.model = SequenceClassifier(backbone, DEMO["pooling"])
        trainable = Trainable.parse(DEMO["trainable"])
        apply_trainable(self.model, trainable)
        self.initial = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        device = torch.device("cpu")
        dtype = resolve_precision(precision, device)
        first = trainable.first_trainable_block(len(backbone.trf_blocks))
        ids = {s: tokenizer.encode_batch(apply_template(SMS_TEMPLATE, d.texts)) for s, d in self.data.items()}
        max_length = min(max(len(x) for x in ids["train"]), backbone.context_length)
        self.batches = {}
        for split, data in self.data.items():
            enc = encode_texts(apply_template(SMS_TEMPLATE, data.texts), tokenizer, max_length,
                               [self.classes.index(label) for label in data.labels], ids[split])
            self.batches[split] = Batches(self.model, enc, DEMO["batch_size"], tokenizer.pad_id, None, device, dtype,
                                          cache_from=first, bucket=DEMO["bucket"] and split == "train",
                                          progress=True, name=f"({split})")
        print(f"model, data and frozen-layer cache: {time.perf_counter() - start:.0f} s "
              f"({', '.join(f'{s} {len(d)}' for s, d in self.data.items())})", flush=True)

    def train(self, **options) -> dict:
        from llmclf.training.args import TrainArgs
        from llmclf.training.classifier import ClassifierTraining
        from llmclf.training.optim import class_weight_tensor

        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if p.requires_grad:
                    p.copy_(self.initial[name])
        args = TrainArgs.for_engine("scratch", **{k: v for k, v in DEMO.items() if k != "pooling"},
                                    log_every=10**9, **options)
        weights = class_weight_tensor(args.class_weights, self.batches["train"].data.labels, len(self.classes))
        start = time.perf_counter()
        history = ClassifierTraining(self.model, self.batches["train"], self.batches["validation"], args, weights,
                                     progress=False, say=lambda _: None).run()
        return {"seconds": time.perf_counter() - start, "best_epoch": history.best_epoch,
                "validation": self.evaluate("validation"), "test": self.evaluate("test")}

    def evaluate(self, split: str) -> dict:
        from llmclf.training.classifier import iter_logits
        from llmclf.training.metrics import classification_metrics

        preds, golds = [], []
        for logits, labels in iter_logits(self.model, self.batches[split]):
            preds += logits.argmax(-1).tolist()
            golds += labels.tolist()
        return classification_metrics(golds, preds, self.classes)


def bench_options(args: argparse.Namespace) -> None:
    prepared = Prepared(Path(args.data), args.precision)
    variants = [(schedule, warmup, clip) for schedule, warmup in (("constant", 0.0), ("linear", 0.1), ("cosine", 0.1))
                for clip in (0.0, 1.0)]
    print(f"\n{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads; demo recipe, "
          f"{DEMO['epochs']} epochs, best epoch by validation accuracy\n")
    print("| lr schedule | warmup | max grad norm | best epoch | validation acc | test acc | test macro-F1 | train s |")
    print("|---|---|---|---|---|---|---|---|")
    results = {}
    for schedule, warmup, clip in variants:
        r = prepared.train(lr_schedule=schedule, warmup=warmup, max_grad_norm=clip)
        results[(schedule, warmup, clip)] = r
        print(f"| {schedule} | {warmup:.0%} | {clip or 'off'} | {r['best_epoch']:g} | "
              f"{r['validation']['accuracy'] * 100:.2f} % | {r['test']['accuracy'] * 100:.2f} % | "
              f"{r['test']['macro_f1']:.4f} | {r['seconds']:.0f} |", flush=True)
    best = max(results, key=lambda k: results[k]["validation"]["accuracy"])
    print(f"\nbest on validation: {best[0]}, warmup {best[1]:.0%}, max grad norm {best[2] or 'off'} "
          f"(first listed wins ties)")


def bench_imbalanced(args: argparse.Namespace) -> None:
    """`llmclf train --class-weights none|balanced` (the public API, either engine) on imbalanced data."""
    from llmclf.classifier import make_classifier
    from llmclf.data.classification import label_order, read_labelled

    data = {s: read_labelled(Path(args.data) / f"{s}.csv") for s in ("train", "validation", "test")}
    positive = label_order(data["train"].labels)[-1]
    print(f"\n{cpu_name()}, torch {torch.__version__}; {args.model}, {args.epochs} epoch(s), batch {args.batch_size}, "
          f"max_length {args.max_length}, engine defaults otherwise; positive class {positive!r}\n")
    print("| class weights | split | accuracy | macro-F1 | spam recall | spam precision | train s |")
    print("|---|---|---|---|---|---|---|")
    for weights in ("none", "balanced"):
        clf = make_classifier(args.model, epochs=args.epochs, class_weights=weights, precision=args.precision,
                              batch_size=args.batch_size, max_length=args.max_length)
        start = time.perf_counter()
        clf.fit(data["train"], data["validation"], progress=False)
        seconds = time.perf_counter() - start
        for split in ("validation", "test"):
            m = clf.evaluate(data[split])
            print(f"| {weights} | {split} (n={m['n']}) | {m['accuracy'] * 100:.2f} % | {m['macro_f1']:.4f} | "
                  f"{m['per_class'][positive]['recall']:.4f} | {m['per_class'][positive]['precision']:.4f} | "
                  f"{seconds:.0f} |", flush=True)


def bench_resume(args: argparse.Namespace) -> None:
    from safetensors.torch import load_file

    data, work = Path(args.data), Path(args.work)
    llmclf = [sys.executable, "-m", "llmclf", "train", "--model", "smollm2-135m", "--train", str(data / "train.csv"),
              "--val", str(data / "validation.csv"), "--template", SMS_TEMPLATE, "--trainable", DEMO["trainable"],
              "--pooling", DEMO["pooling"], "--lr", str(DEMO["lr"]), "--epochs", str(DEMO["epochs"]), "--bucket",
              "--no-progress", "--precision", args.precision]
    from llmclf.data.classification import read_labelled

    steps_per_epoch = -(-len(read_labelled(data / "train.csv")) // DEMO["batch_size"])

    def timed(command: list[str]) -> float:
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - start

    whole = timed([*llmclf, "--out", str(work / "whole")])
    print(f"uninterrupted: {whole:.1f} s", flush=True)
    out = work / "killed"
    target = args.kill_after_epoch * steps_per_epoch
    start = time.perf_counter()
    process = subprocess.Popen([*llmclf, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = None
    while process.poll() is None:
        done = [p for p in (out / "checkpoints").glob("state-*.pt") if int(p.stem.split("-")[1]) >= target]
        if done:
            state = done[0]
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    process.wait()
    killed = time.perf_counter() - start
    size = state.stat().st_size if state is not None and state.exists() else None
    resumed = timed([*llmclf, "--out", str(out), "--resume"])
    a, b = load_file(work / "whole" / "model.safetensors"), load_file(out / "model.safetensors")
    identical = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    print(f"\n{cpu_name()}, torch {torch.__version__}")
    print(f"uninterrupted {DEMO['epochs']}-epoch training:        {whole:7.1f} s")
    print(f"killed after epoch {args.kill_after_epoch} ({state.name if state else '?'}) + resumed: "
          f"{killed:7.1f} + {resumed:7.1f} = {killed + resumed:7.1f} s  ({(killed + resumed) / whole:.2f}x)")
    print(f"one training state: {size / 2**20:.1f} MiB" if size else "one training state: (not found)")
    print(f"final models identical: {identical}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("options", "imbalanced", "resume"))
    parser.add_argument("--data", required=True, help="directory with train.csv, validation.csv, test.csv")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--epochs", type=int, default=3, help="imbalanced: epochs")
    parser.add_argument("--model", default="all-minilm-l6-v2", help="imbalanced: backbone (any engine)")
    parser.add_argument("--batch-size", type=int, default=8, help="imbalanced: texts per batch")
    parser.add_argument("--max-length", type=int, default=None, help="imbalanced: tokens per text")
    parser.add_argument("--work", default="runs/bench-resume", help="resume: output directories")
    parser.add_argument("--kill-after-epoch", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("LLMCLF_BENCH_THREADS", torch.get_num_threads())))
    {"options": bench_options, "imbalanced": bench_imbalanced, "resume": bench_resume}[args.what](args)


if __name__ == "__main__":
    main()
