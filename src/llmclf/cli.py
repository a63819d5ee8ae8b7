"""The `llmclf` command line: thin wrappers over `llmclf.language_model` and `llmclf.classifier`."""

from __future__ import annotations

import json
import logging
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from llmclf import distributed
from llmclf import language_model as lm
from llmclf.config import DEFAULT_BACKBONE, DEFAULT_MODEL
from llmclf.errors import LlmclfError
from llmclf.explain import DEFAULT_STEPS as EXPLAIN_STEPS
from llmclf.explain import MAX_STEPS as MAX_EXPLAIN_STEPS
from llmclf.explain import METHODS as EXPLAIN_METHODS
from llmclf.families import FAMILIES
from llmclf.loaders.spec import DEFAULT_SEED
from llmclf.models.heads import POOLINGS
from llmclf.runtime import PRECISIONS, auto_precision_note
from llmclf.serve import defaults as serving
from llmclf.training.args import RECIPES
from llmclf.training.state import Interrupted, TrainingInterruptedError, raise_interrupted
from llmclf.tuning import DEFAULT_RECIPES, HF_RECIPES


def examples(*lines: str, more: str | None = None) -> str:
    """A command's epilog: example command lines, shown verbatim at the end of its --help (markdown
    mode would join single lines, so they go in a code block)."""
    return "Examples:\n\n```\n" + "\n".join(lines) + "\n```" + (f"\n\n{more}" if more else "")


app = typer.Typer(
    name="llmclf",
    help="Turn pretrained language models into text classifiers: build, evaluate, train, generate.",
    epilog=examples(
        "llmclf data split reviews.csv --out data/reviews --text-col review \\",
        "    --label-col sentiment --stratify",
        "llmclf train --train data/reviews/train.csv \\",
        "    --val data/reviews/validation.csv --test data/reviews/test.csv \\",
        "    --out runs/reviews",
        "llmclf evaluate --model runs/reviews --data data/reviews/test.csv",
        "llmclf predict --model runs/reviews \"What a wonderful film.\"",
        "llmclf serve --model runs/reviews",
        more="Each command's --help ends with its examples; the guide is README.md and docs/."),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # single newlines in docstrings join, as in prose
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Options shared by every command that builds a model.
DevicesOpt = Annotated[Optional[int], typer.Option(
    "--devices", min=1, help="Run as N worker processes on this machine, started by torch's elastic agent "
    "(the same as `torchrun --nproc-per-node N -m llmclf ...`): one per GPU (cuda:0..N-1, NCCL), or N CPU "
    "processes (gloo) without GPUs.")]
MaxRestartsOpt = Annotated[int, typer.Option(
    "--max-restarts", min=0, help="With --devices: when a worker fails, restart the whole group up to K times; "
    "training resumes from its last training state (as `torchrun --max-restarts K`).")]


def relaunched(devices: int | None, max_restarts: int) -> bool:
    """With `--devices N` (N > 1) in a process that is not already a worker: run this same command
    line as N workers through torch's elastic agent, wait for them, and return True."""
    if devices is None or devices == 1 or distributed.launched():
        return False
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        distributed.launch_local(devices, sys.argv[1:], max_restarts)
    except ChildFailedError as exc:
        raise LlmclfError(f"{len(exc.failures)} of {devices} worker process(es) failed"
                          + (f" (after {max_restarts} restart(s))" if max_restarts else "")
                          + "; their errors are above") from None
    return True


ModelOpt = Annotated[str, typer.Option(
    "--model", "-m", help=f"A preset ({', '.join(n for f in FAMILIES.values() for n in f.presets)}) or packaged "
    f"model ({'; '.join(f'{n}: {m.title}' for f in FAMILIES.values() for n, m in f.packaged.items())}), a .gguf file, "
    f"a Hugging Face directory of a registered family ({', '.join(FAMILIES)}), an llmclf checkpoint directory, "
    "or a state_dict file (.pth, .safetensors) with --base-config.")]
RandomInitOpt = Annotated[bool, typer.Option(
    "--random-init", help="With a preset: random weights after torch.manual_seed(--seed) instead of "
    "downloading the pretrained ones.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed (model init, data order, sampling).")]
BaseConfigOpt = Annotated[Optional[str], typer.Option(
    "--base-config", help="Architecture of a bare state_dict file: a preset name or a JSON config file.")]
ContextLengthOpt = Annotated[Optional[int], typer.Option(
    "--context-length", min=1, help="Override the context length (window size of language-model data).")]
DropRateOpt = Annotated[Optional[float], typer.Option(
    "--drop-rate", min=0.0, max=0.99, help="Override the dropout rate.")]
QkvBiasOpt = Annotated[Optional[bool], typer.Option(
    "--qkv-bias/--no-qkv-bias", help="Override whether query/key/value projections have a bias.",
    show_default=False)]
TokenizerDirOpt = Annotated[Optional[Path], typer.Option(
    "--tokenizer-dir", help="Directory with encoder.json + vocab.bpe (or vocab.json + merges.txt); "
    "default: the model directory, then $LLMCLF_GPT2_TOKENIZER_DIR, then tiktoken's download.")]
PrecisionOpt = Annotated[str, typer.Option(
    "--precision", help="auto = bfloat16 where the hardware runs it fast (a CPU with AMX or AVX512-BF16, a bf16 "
    f"GPU), else float32; {auto_precision_note()}. ONNX exports: float32 or int8 (auto: int8 when exported with "
    "--quantize int8).")]
BackendOpt = Annotated[str, typer.Option(
    "--backend", help="torch: a directory `llmclf train` wrote, run by PyTorch; onnx: an export of `llmclf export "
    "--format onnx`, run by ONNX Runtime (faster on CPUs, int8 with --quantize int8; no MC-dropout); auto: "
    "whichever --model is.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, cuda:1 ... (default: auto).")]


def _check_precision(precision: str) -> None:
    if precision not in (*PRECISIONS, "int8"):
        raise typer.BadParameter(f"{precision!r} is not one of {', '.join(PRECISIONS)}, int8 (ONNX exports)",
                                 param_hint="--precision")


def _load(model: str, random_init: bool, seed: int, base_config: Optional[str], context_length: Optional[int],
          drop_rate: Optional[float], qkv_bias: Optional[bool], tokenizer_dir: Optional[Path]):
    return lm.load_model(model, random_init=random_init, seed=seed, base_config=base_config,
                         context_length=context_length, drop_rate=drop_rate, qkv_bias=qkv_bias,
                         tokenizer_dir=tokenizer_dir)


@app.command(epilog=examples(
    "llmclf generate --model smollm2-135m --prompt \"The capital of France is\"",
    "llmclf generate --model runs/verdict --prompt \"Every effort moves you\" \\",
    "    --temperature 1.4 --top-k 25 --seed 123",
    "llmclf generate --model gpt2-small --random-init --context-length 256 \\",
    "    --drop-rate 0.1 --no-qkv-bias --prompt \"Every effort moves you\"",
))
def generate(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue.")],
    model: ModelOpt = DEFAULT_MODEL,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Tokens to add.")] = 50,
    temperature: Annotated[float, typer.Option(
        "--temperature", min=0.0, help="0 = greedy; higher = more random sampling.")] = 0.0,
    top_k: Annotated[Optional[int], typer.Option("--top-k", min=1, help="Sample among the k likeliest.")] = None,
    no_kv_cache: Annotated[bool, typer.Option(
        "--no-kv-cache", help="Recompute the whole context for every token (the book's loop).")] = False,
    random_init: RandomInitOpt = False,
    seed: SeedOpt = DEFAULT_SEED,
    base_config: BaseConfigOpt = None,
    context_length: ContextLengthOpt = None,
    drop_rate: DropRateOpt = None,
    qkv_bias: QkvBiasOpt = None,
    tokenizer_dir: TokenizerDirOpt = None,
    precision: PrecisionOpt = "auto",
    device: DeviceOpt = None,
) -> None:
    """Continue a prompt with a language model (greedy, or temperature/top-k sampling)."""
    _check_precision(precision)
    gpt, tokenizer = _load(model, random_init, seed, base_config, context_length, drop_rate, qkv_bias, tokenizer_dir)
    start = time.perf_counter()
    text = lm.generate_text(gpt, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_k=top_k, seed=seed, use_kv_cache=not no_kv_cache, precision=precision,
                            device=device)
    typer.echo(text)
    logging.getLogger("llmclf").info("generated in %.2f s", time.perf_counter() - start)


@app.command("lm-eval", epilog=examples(
    "llmclf lm-eval --model gemma3-270m --text the-verdict.txt \\",
    "    --context-length 256",
    "llmclf lm-eval --model runs/verdict --text the-verdict.txt --json",
))
def lm_eval(
    text: Annotated[Path, typer.Option("--text", "-t", help="UTF-8 text file to evaluate on.")],
    model: ModelOpt = DEFAULT_MODEL,
    stride: Annotated[Optional[int], typer.Option(
        "--stride", min=1, help="Tokens between window starts (default: the context length).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Windows per batch.")] = 2,
    train_ratio: Annotated[float, typer.Option(
        "--train-ratio", min=0.01, max=0.99, help="Share of characters in the training part.")] = 0.9,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    random_init: RandomInitOpt = False,
    seed: SeedOpt = DEFAULT_SEED,
    base_config: BaseConfigOpt = None,
    context_length: ContextLengthOpt = None,
    drop_rate: DropRateOpt = None,
    qkv_bias: QkvBiasOpt = None,
    tokenizer_dir: TokenizerDirOpt = None,
    precision: PrecisionOpt = "auto",
    device: DeviceOpt = None,
) -> None:
    """Language-model cross-entropy and perplexity on a text (the book's train/validation split)."""
    _check_precision(precision)
    from llmclf.data.lm import read_text

    content = read_text(text)
    gpt, tokenizer = _load(model, random_init, seed, base_config, context_length, drop_rate, qkv_bias, tokenizer_dir)
    result = lm.evaluate_lm(gpt, tokenizer, content, stride=stride, batch_size=batch_size,
                            train_ratio=train_ratio, seed=seed, precision=precision, device=device)
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
        return
    typer.echo(f"train loss {result.train_loss:.4f}  perplexity {result.train_perplexity:.2f}  "
               f"({result.train_batches} batches)")
    typer.echo(f"val   loss {result.val_loss:.4f}  perplexity {result.val_perplexity:.2f}  "
               f"({result.val_batches} batches)")


@app.command(epilog=examples(
    "llmclf pretrain --model gpt2-small --random-init --context-length 256 \\",
    "    --drop-rate 0.1 --no-qkv-bias --text the-verdict.txt \\",
    "    --out runs/verdict",
    "llmclf pretrain ... --out runs/verdict --resume   # an interrupted run",
))
def pretrain(
    text: Annotated[Path, typer.Option("--text", "-t", help="UTF-8 text file to train on.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (checkpoint, history, loss.png).")],
    model: ModelOpt = "gpt2-small",
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Passes over the training text.")] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Windows per step.")] = 2,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="AdamW learning rate.")] = 4e-4,
    weight_decay: Annotated[float, typer.Option("--weight-decay", min=0.0, help="AdamW weight decay.")] = 0.1,
    eval_freq: Annotated[int, typer.Option("--eval-freq", min=1, help="Evaluate every N steps.")] = 5,
    eval_iter: Annotated[int, typer.Option("--eval-iter", min=1, help="Batches per evaluation.")] = 5,
    start_context: Annotated[str, typer.Option(
        "--start-context", help="Prompt of the sample printed after each epoch.")] = "Every effort moves you",
    stride: Annotated[Optional[int], typer.Option(
        "--stride", min=1, help="Tokens between window starts (default: the context length).")] = None,
    train_ratio: Annotated[float, typer.Option(
        "--train-ratio", min=0.01, max=0.99, help="Share of characters used for training.")] = 0.9,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the run saved in --out (its weights, optimizer and history).")] = False,
    random_init: RandomInitOpt = False,
    seed: SeedOpt = DEFAULT_SEED,
    base_config: BaseConfigOpt = None,
    context_length: ContextLengthOpt = None,
    drop_rate: DropRateOpt = None,
    qkv_bias: QkvBiasOpt = None,
    tokenizer_dir: TokenizerDirOpt = None,
    precision: PrecisionOpt = "auto",
    device: DeviceOpt = None,
) -> None:
    """Pretrain (or continue training) a language model on a text, as the book's chapter 5 does."""
    _check_precision(precision)
    from llmclf.data.lm import read_text

    content = read_text(text)
    gpt, tokenizer = _load(model, random_init, seed, base_config, context_length, drop_rate, qkv_bias, tokenizer_dir)
    start = time.perf_counter()
    history = lm.pretrain(gpt, tokenizer, content, out, epochs=epochs, batch_size=batch_size, lr=lr,
                          weight_decay=weight_decay, eval_freq=eval_freq, eval_iter=eval_iter,
                          start_context=start_context, stride=stride, train_ratio=train_ratio, seed=seed,
                          precision=precision, device=device, resume=resume)
    minutes = (time.perf_counter() - start) / 60
    if history.train_losses:
        typer.echo(f"final train loss {history.train_losses[-1]:.3f}, val loss {history.val_losses[-1]:.3f}; "
                   f"{history.tokens_seen} tokens seen in {minutes:.1f} min")
    typer.echo(f"saved to {out}/ (model.safetensors, config.json, trainer_state.json, loss.png)")


# --- data -------------------------------------------------------------------------------------

data_app = typer.Typer(help="Prepare labelled data sets (train/validation/test CSV files).", no_args_is_help=True,
                       epilog=examples(
                           "llmclf data split reviews.csv --out data/reviews --stratify",
                           "llmclf data sms-spam --out data/sms",
                       ))
app.add_typer(data_app, name="data")

TextColOpt = Annotated[str, typer.Option("--text-col", help="Column holding the text.")]
LabelColOpt = Annotated[str, typer.Option("--label-col", help="Column holding the label (names or integers).")]


@data_app.command("sms-spam", epilog=examples(
    "llmclf data sms-spam --out data/sms         # downloads the UCI archive",
    "llmclf data sms-spam --out data/sms --source sms_spam_collection.zip",
    "llmclf data sms-spam --out data/sms-all --no-balance",
))
def data_sms_spam(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for train.csv, validation.csv, test.csv.")],
    source: Annotated[Optional[str], typer.Option(
        "--source", help="URL, the UCI zip, or the raw SMSSpamCollection file (default: download, cached).")] = None,
    seed: SeedOpt = DEFAULT_SEED,
    no_balance: Annotated[bool, typer.Option(
        "--no-balance", help="Keep all ham messages instead of sampling as many as there is spam.")] = False,
) -> None:
    """The UCI SMS Spam Collection, balanced and split 70/10/20 as the course does."""
    from llmclf.data.classification import prepare_sms_spam

    counts = prepare_sms_spam(out, source, seed=seed, balance=not no_balance)
    for name, c in counts.items():
        typer.echo(f"{name:10s} {c['rows']:5d} rows  " + "  ".join(f"{k} {v}" for k, v in c.items() if k != "rows"))
    typer.echo(f"written to {out}/")


@data_app.command("split", epilog=examples(
    "llmclf data split reviews.csv --out data/reviews --text-col review \\",
    "    --label-col sentiment --stratify",
    "llmclf data split imdb.csv --out data/imdb --ratios 0.8,0.2,0 --seed 42 \\",
    "    --label-names 0=negative,1=positive",
))
def data_split(
    file: Annotated[Path, typer.Argument(help="CSV, TSV or JSONL file with a header.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for train.csv, validation.csv, test.csv.")],
    ratios: Annotated[str, typer.Option(
        "--ratios", help="train,validation,test shares; a 0 share writes no file and removes the one an earlier "
        "split left (0.8,0.2,0 = 80/20).",
    )] = "0.7,0.1,0.2",
    stratify: Annotated[bool, typer.Option("--stratify", help="Keep label proportions in every split.")] = False,
    seed: SeedOpt = DEFAULT_SEED,
    text_col: TextColOpt = "text",
    label_col: LabelColOpt = "label",
    label_names: Annotated[Optional[str], typer.Option(
        "--label-names", help="Rename the labels in the written files, e.g. 0=negative,1=positive "
        "(predictions then print the names).")] = None,
    label_sep: Annotated[Optional[str], typer.Option(
        "--label-sep", help="Multi-label: each label is a set of labels joined by SEP (JSON lists are multi-label "
        "anyway); --stratify then uses iterative stratification, every label kept in train.")] = None,
) -> None:
    """Split one labelled file into train/validation/test CSV files (columns text,label)."""
    from llmclf.data.classification import split_file

    try:
        shares = tuple(float(x) for x in ratios.split(","))
    except ValueError:
        raise typer.BadParameter(f"{ratios!r} is not three comma-separated numbers", param_hint="--ratios") from None
    written = split_file(file, out, shares, stratify, seed, text_col, label_col, label_names, label_sep)
    for name, (rows, stale) in written.items():
        typer.echo(f"{name:10s} {rows:6d} rows" + (
            "" if rows else f" (share 0: no file written{f'; the old {name}.csv removed' if stale else ''})"))
    typer.echo(f"written to {out}/")


# --- classification ---------------------------------------------------------------------------

def with_train_args(func):
    """Add every `TrainArgs` option to a typer command as `--flag` (help and defaults from the one
    definition); the command receives the options the user gave as `train_args` (a dict), so the
    library fills in each engine's defaults and validates them all at once."""
    import dataclasses
    import functools
    import inspect

    from llmclf.training.args import TrainArgs

    fields = {f.name: f for f in dataclasses.fields(TrainArgs)}
    params = [p for p in inspect.signature(func, eval_str=True).parameters.values() if p.name != "train_args"]
    for name, f in fields.items():
        base_type = next(t for t in (bool, int, float, str) if t.__name__ in str(f.type))
        meta = f.metadata
        flag = meta["flag"] or ("--{0}/--no-{0}" if base_type is bool else "--{0}").format(name.replace("_", "-"))
        option = typer.Option(flag, help=TrainArgs.help(name), metavar=meta["metavar"], show_default=False,
                              rich_help_panel="Training options")
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[Optional[base_type], option]))

    @functools.wraps(func)
    def command(**kwargs):
        given = {}
        for name in fields:
            value = kwargs.pop(name)
            if value is not None:
                convert = fields[name].metadata["from_cli"]
                given[name] = convert(value) if convert else value
        return func(**kwargs, train_args=given)

    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    del command.__wrapped__  # typer must read the signature above, not func's
    return command


@app.command(epilog=examples(
    "llmclf train --train data/sms/train.csv --val data/sms/validation.csv \\",
    "    --test data/sms/test.csv --out runs/spam",
    "llmclf train --model smollm2-135m --recipe course \\",
    "    --train data/sms/train.csv --val data/sms/validation.csv \\",
    "    --out runs/spam-course",
    "llmclf train --model all-minilm-l6-v2 --epochs 5 --lr 5e-5 \\",
    "    --train data/imdb/train.csv --val data/imdb/validation.csv \\",
    "    --out runs/imdb",
    "llmclf train ... --out runs/spam --resume    # an interrupted run",
    "llmclf train --devices 2 ... --out runs/spam # two worker processes",
    more="Every option: docs/training.md."))
@with_train_args
def train(
    train_file: Annotated[Path, typer.Option("--train", help="Training data (CSV, TSV or JSONL).")],
    val_file: Annotated[Path, typer.Option("--val", help="Validation data (model selection, early stopping).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory for the trained classifier.")],
    model: ModelOpt = DEFAULT_BACKBONE,
    recipe: Annotated[Optional[str], typer.Option(
        "--recipe", help=f"A named set of training options ({', '.join(RECIPES)}): course = the course's "
        "chapter-6 recipe (last block, no template, 5 epochs, lr 5e-5). Options given explicitly win. "
        "Default: llmclf's cross-validated defaults.")] = None,
    engine: Annotated[str, typer.Option(
        "--engine", help="scratch (llmclf's own model code) | hf (transformers Trainer, encoder models) | "
        "auto (hf for encoders such as the packaged all-minilm-l6-v2 and all-mpnet-base-v2 or BERT directories, "
        "else scratch).")] = "auto",
    test_file: Annotated[Optional[Path], typer.Option("--test", help="Test data, evaluated once at the end.")] = None,
    text_col: TextColOpt = "text",
    label_col: LabelColOpt = "label",
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the interrupted run in --out from its newest training state (same "
        "arguments and data required; --progress, --device, --save-every, --log-every, --eval-iter and "
        "--eval-batch-size may differ). On a run that already finished: says so and loads its model.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bars on stderr.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the final metrics as one JSON object.")] = False,
    devices: DevicesOpt = None,
    max_restarts: MaxRestartsOpt = 0,
    random_init: RandomInitOpt = False,
    base_config: BaseConfigOpt = None,
    context_length: ContextLengthOpt = None,
    drop_rate: DropRateOpt = None,
    qkv_bias: QkvBiasOpt = None,
    tokenizer_dir: TokenizerDirOpt = None,
    train_args: Optional[dict] = None,
) -> None:
    """Fine-tune a pretrained model into a text classifier and save it to --out.

    Two engines, one set of training options with one meaning: `scratch` puts a new head on
    llmclf's own models (GPT-2, Llama, Qwen3, Gemma 3; chosen layers trainable, frozen layers cached); `hf`
    fine-tunes encoders (BERT family, all-minilm-l6-v2, all-mpnet-base-v2) with transformers' Trainer. Where the
    engines' defaults differ, both are shown. A training state is saved in --out/checkpoints after
    every epoch (and every --save-every steps): an interrupted run continues with --resume.

    Several processes: `--devices N`, or `torchrun --nproc-per-node N -m llmclf train ...` (also
    across machines); each process takes --batch-size texts of every global batch.
    """
    if relaunched(devices, max_restarts):
        return
    from llmclf.classifier import train_classifier

    model_options = {"random_init": random_init, "base_config": base_config, "context_length": context_length,
                     "drop_rate": drop_rate, "qkv_bias": qkv_bias, "tokenizer_dir": tokenizer_dir}
    clf, result = train_classifier(model, train_file, val_file, out, engine, recipe, test_file, text_col, label_col,
                                   progress, resume, model_options, train_args)
    if result is None:
        return  # rank 0 reports
    if getattr(clf, "finished_before_", None):
        typer.echo(f"{clf.finished_before_} (its model is loaded)", err=True)
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo(f"trained in {clf.train_seconds_:.1f} s ({clf.engine} engine); saved to {out}/")
    for split in ("validation", "test"):
        if split in result:
            m = result[split]
            typer.echo(f"{split:10s} accuracy {m['accuracy'] * 100:6.2f}%  macro-F1 {m['macro_f1']:.4f}  "
                       f"loss {m['loss']:.4f}  ECE {m['ece']:.4f}  (n={m['n']})")


@app.command("tune", epilog=examples(
    "llmclf tune --train data/sms/train.csv --val data/sms/validation.csv \\",
    "    --test data/sms/test.csv --budget 10m --out runs/tuned",
    "llmclf tune ... --out runs/tuned --budget 30m --resume",
    "llmclf tune ... --backbones gemma3-270m,all-minilm-l6-v2 \\",
    "    --recipes head:mean:1e-3:8,last-n:2:last:1e-4:4",
    "llmclf predict --model runs/tuned/model \"Is this spam?\"",
    more="Output: OUT/leaderboard.csv and .png (mean and std over the folds per candidate, and what the budget "
    "skipped), OUT/tune.json (the search) and OUT/model (the winner)."))
def tune_command(
    train_file: Annotated[Path, typer.Option("--train", help="Training data (CSV, TSV or JSONL).")],
    val_file: Annotated[Path, typer.Option("--val", help="Validation data: cross-validated with the training data, "
                                           "then the winner's best epoch is chosen on it.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory: leaderboard.csv, leaderboard.png, "
                                      "tune.json (the search, for --resume) and model/ (the winner).")],
    budget: Annotated[str, typer.Option("--budget", help="Wall time for the whole search, the winner's training "
                                        "(and --test score) included: 30m, 1h, 90s, 1h30m. Candidates that "
                                        "would not fit are skipped and listed.")] = "30m",
    test_file: Annotated[Optional[Path], typer.Option("--test", help="Test data, scored once by the winner.")] = None,
    backbones: Annotated[Optional[str], typer.Option(
        "--backbones", help="Comma-separated model specs to search. Default: every installed packaged backbone, "
        "both engines (smallest first).")] = None,
    recipes: Annotated[Optional[str], typer.Option(
        "--recipes", help="Comma-separated scratch-engine recipes TRAINABLE:POOLING:LR:EPOCHS[+ENSEMBLE], each "
        "scored after every epoch up to EPOCHS; ENSEMBLE is a value of train's --ensemble (tfidf, "
        "tfidf+all-minilm-l6-v2: a blend's sentence encoder is also scored alone, as a reference). "
        f"Default: {', '.join(DEFAULT_RECIPES)} (a blend whose encoder is not installed left out).")] = None,
    hf_recipes: Annotated[Optional[str], typer.Option(
        "--hf-recipes", help="Comma-separated Transformers-engine recipes LR:EPOCHS[+ENSEMBLE] (the whole encoder is "
        f"trained). Default: {', '.join(HF_RECIPES)}.")] = None,
    folds: Annotated[int, typer.Option("--folds", min=2, help="k of the stratified k-fold cross-validation.")] = 5,
    seed: Annotated[int, typer.Option("--seed", help="Seeds the folds and every training run: the same seed "
                                      "gives the same leaderboard.")] = 123,
    metric: Annotated[str, typer.Option("--metric", help="What ranks the candidates: accuracy | macro_f1 (both "
                                        "are reported).")] = "accuracy",
    max_length: Annotated[Optional[int], typer.Option("--max-length", min=1, help="Tokens per text (default: as "
                                                      "train, the longest training text).")] = None,
    text_col: TextColOpt = "text",
    label_col: LabelColOpt = "label",
    resume: Annotated[bool, typer.Option("--resume", help="Continue the search in --out (an interrupted one, or "
                                         "with a larger --budget): scored candidates are kept.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bars on stderr.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the leaderboard and the winner as JSON.")] = False,
) -> None:
    """Choose the backbone and recipe for your data: k-fold cross-validation on train + validation within
    a time budget, then the winner trained as `train` trains it and saved to --out/model.

    Each backbone reads every text once through its frozen layers; its recipes and folds share those
    states, so cheap candidates (the TF-IDF reference, heads on frozen states) come first and a short
    budget still returns a model. Ctrl-C keeps the leaderboard so far; --resume continues.
    """
    from llmclf.data.classification import read_labelled
    from llmclf.tuning import tune

    split = lambda text: [part.strip() for part in text.split(",") if part.strip()] if text else None  # noqa: E731
    result = tune(read_labelled(train_file, text_col, label_col), read_labelled(val_file, text_col, label_col),
                  out, budget=budget, backbones=split(backbones), recipes=split(recipes),
                  hf_recipes=split(hf_recipes), folds=folds, seed=seed, metric=metric, max_length=max_length,
                  test=read_labelled(test_file, text_col, label_col) if test_file else None, resume=resume,
                  progress=progress)
    if as_json:
        typer.echo(json.dumps({"leaderboard": result.leaderboard, "skipped": result.skipped, "winner": result.winner,
                               "model": str(out / "model"), "test": result.test_metrics}))
        return
    typer.echo(f"{'rank':>4s}  {'candidate':52s} {'epochs':>6s} {'accuracy':>15s} {'macro-F1':>15s} {'seconds':>8s}")
    for row in result.leaderboard:
        typer.echo(f"{row['rank']:4d}  {row['candidate']:52s} {row['epochs']:6d} "
                   f"{row['accuracy'] * 100:7.2f} +- {row['accuracy_std'] * 100:4.2f} "
                   f"{row['macro_f1']:7.4f} +- {row['macro_f1_std']:.3f} {row['seconds']:8.1f}")
    for row in result.skipped:
        typer.echo(f"skipped: {row['backbone']}|{row['recipe']}: {row['reason']}")
    typer.echo(f"winner: {result.winner['candidate']} x{result.winner['epochs']} epochs; saved to {out / 'model'}/ "
               f"(leaderboard: {out / 'leaderboard.csv'}, {out / 'leaderboard.png'})")
    if result.test_metrics is not None:
        m = result.test_metrics
        typer.echo(f"test       accuracy {m['accuracy'] * 100:6.2f}%  macro-F1 {m['macro_f1']:.4f}  "
                   f"loss {m['loss']:.4f}  (n={m['n']})")


@app.command("inspect", epilog=examples(
    "llmclf inspect --data data/sms/train.csv --out runs/sms-issues",
    "llmclf inspect --data data/sms/train.csv --model smollm2-135m --folds 5",
    "llmclf inspect --data reviews.csv --model runs/reviews --text-col review \\",
    "    --label-col sentiment --out runs/review-issues",
    more="Output: OUT/label_issues.csv (every row, most suspect label first: row, text, given_label, "
    "suggested_label, label_quality, is_issue, duplicate_of, outlier_score) and OUT/report.json."))
def inspect_command(
    data: Annotated[Path, typer.Option("--data", "-d", help="Labelled data (CSV, TSV or JSONL).")],
    model: Annotated[str, typer.Option(
        "--model", "-m", help="tfidf (the n-gram model: seconds), or a scratch-engine backbone or model directory "
        "trained from one: a logistic regression on its mean-pooled final states.")] = "tfidf",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write label_issues.csv and report.json "
                                                "here.")] = None,
    folds: Annotated[int, typer.Option("--folds", min=2, help="k of the stratified k-fold that gives every "
                                       "example probabilities from a model that did not see it.")] = 5,
    seed: Annotated[int, typer.Option("--seed", help="Seeds the folds.")] = 123,
    duplicate_threshold: Annotated[float, typer.Option(
        "--duplicate-threshold", help="Cosine similarity from which two examples are near-duplicates.")] = 0.95,
    top: Annotated[int, typer.Option("--top", min=0, help="Suspected label errors to print.")] = 10,
    max_length: MaxLengthOverrideOpt = None,
    text_col: TextColOpt = "text",
    label_col: LabelColOpt = "label",
    precision: PrecisionOpt = "auto",
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bars on stderr.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Find likely label errors, near-duplicates, outliers and overlapping classes in labelled data.

    Out-of-fold class probabilities (k-fold on frozen features, a cheap model per fold) go to
    cleanlab's confident learning; cosine neighbours of the same features give duplicates and outliers.
    """
    _check_precision(precision)
    from llmclf.data.classification import read_labelled
    from llmclf.inspect_data import inspect_data

    result = inspect_data(read_labelled(data, text_col, label_col), out, model=model, folds=folds, seed=seed,
                          duplicate_threshold=duplicate_threshold, max_length=max_length, progress=progress,
                          precision=precision)
    report = result.report
    if as_json:
        typer.echo(json.dumps(report))
        return
    typer.echo(f"{report['examples']} examples, out-of-fold accuracy {report['out_of_fold_accuracy'] * 100:.2f}% "
               f"({model}, {folds} folds): {report['label_issues']} likely label errors, "
               f"{report['near_duplicates']} near-duplicates ({report['near_duplicates_with_another_label']} with "
               f"another label)")
    for pair in report["overlapping_classes"][:3]:
        typer.echo(f"overlap {pair['class_a']} / {pair['class_b']}: {pair['examples']} examples")
    for row in result.issues[:top]:
        text = row["text"] if len(row["text"]) <= 70 else row["text"][:67] + "..."
        typer.echo(f"row {row['row']:>6}  {row['given_label']} -> {row['suggested_label']}  "
                   f"quality {row['label_quality']:.3f}  {text!r}")
    if out is not None:
        typer.echo(f"wrote {out / 'label_issues.csv'} and {out / 'report.json'}")


# --- zero- and few-shot (llmclf.zero_shot) ------------------------------------------------------

ZERO_SHOT_OPTIONS = {
    "zero_shot": (bool, False, typer.Option(
        "--zero-shot", help="No trained model: --model is an instruction-tuned causal LM (smollm2-135m, "
        "qwen2.5-0.5b, gemma3-270m, ...) that scores each of --labels as the answer to a prompt in its chat format.",
        rich_help_panel="Zero-/few-shot")),
    "labels": (Optional[str], None, typer.Option(
        "--labels", help="With --zero-shot: the class names, comma-separated, in the order of the output columns "
        "(e.g. \"positive,negative\"); NAME=WORDS has the model read and score WORDS for class NAME (e.g. "
        "\"ham=not spam,spam\").", rich_help_panel="Zero-/few-shot")),
    "template": (Optional[str], None, typer.Option(
        "--template", help="With --zero-shot: the user's message, with {text}, optionally {labels} and {examples} "
        "(default: \"Classify the text as one of: {labels}. Answer with the label only.\\n\\n{examples}Text: "
        "{text}\").", rich_help_panel="Zero-/few-shot")),
    "score": (str, "mean", typer.Option(
        "--score", help="With --zero-shot: a label's score is the mean or sum of its tokens' log-probabilities.",
        rich_help_panel="Zero-/few-shot")),
    "shots": (int, 0, typer.Option(
        "--shots", min=0, help="With --zero-shot: K labelled examples per class (from --train) in the prompt.",
        rich_help_panel="Zero-/few-shot")),
    "train": (Optional[Path], None, typer.Option(
        "--train", help="With --shots: labelled file (CSV, TSV or JSONL, columns text,label) to take examples from.",
        rich_help_panel="Zero-/few-shot")),
    "shot_selection": (str, "random", typer.Option(
        "--shot-selection", help="With --shots: random (one seeded draw, shared by every text) or nearest (per text, "
        "the examples nearest by the model's embeddings; slower).", rich_help_panel="Zero-/few-shot")),
    "shot_seed": (int, DEFAULT_SEED, typer.Option(
        "--shot-seed", help="With --shots random: the seed of the draw.", rich_help_panel="Zero-/few-shot")),
    "calibrate": (str, "none", typer.Option(
        "--calibrate", help="With --zero-shot: none, or content-free (contextual calibration: each label's "
        "probability divided by its probability for texts with no content, \"N/A\", \"\" and \"[MASK]\"; "
        "removes the prompt's bias toward some labels).", rich_help_panel="Zero-/few-shot")),
}


def with_zero_shot_options(func):
    """Add the zero-/few-shot options to a command that loads a classifier; it receives them as
    `zero_shot` (a dict, or None without --zero-shot)."""
    import functools
    import inspect

    params = [p for p in inspect.signature(func, eval_str=True).parameters.values() if p.name != "zero_shot"]
    for name, (kind, default, option) in ZERO_SHOT_OPTIONS.items():
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Annotated[kind, option]))

    @functools.wraps(func)
    def command(**kwargs):
        options = {name: kwargs.pop(name) for name in ZERO_SHOT_OPTIONS}
        if not options.pop("zero_shot"):
            given = [f"--{n.replace('_', '-')}" for n, (_, default, _) in ZERO_SHOT_OPTIONS.items()
                     if n in options and options[n] != default]
            if given:
                raise typer.BadParameter(f"{', '.join(given)} apply with --zero-shot only", param_hint=given[0])
            return func(**kwargs, zero_shot=None)
        return func(**kwargs, zero_shot=options)

    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    del command.__wrapped__
    return command


def _zero_shot_classifier(model: str, options: dict, max_length, precision: str, device):
    """The `ZeroShotClassifier` the --zero-shot options describe, fitted (examples read from --train)."""
    from llmclf.data.classification import read_labelled
    from llmclf.zero_shot import ZeroShotClassifier

    if options["labels"] is None:
        raise typer.BadParameter("--zero-shot needs the class names, e.g. --labels \"positive,negative\"",
                                 param_hint="--labels")
    labels = [x.strip() for x in options["labels"].split(",")] if options["labels"].strip() else []
    if options["shots"] and options["train"] is None:
        raise typer.BadParameter(f"--shots {options['shots']} takes its examples from --train FILE",
                                 param_hint="--train")
    examples = read_labelled(options["train"]) if options["train"] is not None else None
    clf = ZeroShotClassifier(model, labels, template=options["template"], score=options["score"],
                             shots=options["shots"], shot_selection=options["shot_selection"],
                             seed=options["shot_seed"], calibrate=options["calibrate"], max_length=max_length,
                             precision=precision, device=device)
    return clf.fit(examples)


def _load_classifier(model: str, backend, base_config, num_classes, pooling, max_length, tokenizer_dir, precision,
                     device):
    from llmclf.classifier import load_classifier

    return load_classifier(model, backend, base_config=base_config, num_classes=num_classes, pooling=pooling,
                           max_length=max_length, tokenizer_dir=tokenizer_dir, precision=precision, device=device)


ClfModelOpt = Annotated[str, typer.Option(
    "--model", "-m", help="A classifier directory written by `llmclf train` or `llmclf export --format onnx`, or a "
    "state_dict file (e.g. the book's review_classifier.pth) with --base-config and --num-classes.")]
NumClassesOpt = Annotated[Optional[int], typer.Option("--num-classes", min=2, help="Classes of a state_dict file.")]
PoolingOverrideOpt = Annotated[Optional[str], typer.Option(
    "--pooling", help=f"Override the pooling ({' | '.join(POOLINGS)}).")]
MaxLengthOverrideOpt = Annotated[Optional[int], typer.Option("--max-length", min=1, help="Override max tokens.")]
DecisionThresholdOpt = Annotated[Optional[float], typer.Option(
    "--decision-threshold", min=0.0, max=1.0, help="Binary models: label a text with the positive class when its "
    "probability reaches P (the class tuned by `train --tune-threshold`, else --positive-label or the second "
    "label), instead of the threshold saved with the model (or the most probable label). Not --threshold, "
    "which only sets the `confident` flag.")]


def _set_decision_threshold(clf, decision_threshold: Optional[float]) -> None:
    if decision_threshold is not None:
        clf.set_decision_threshold(decision_threshold)


def _decision_note(clf) -> str:
    decision = clf.decision
    if decision is None:
        return ""
    positive = clf.classes_[decision.positive]
    return f"decision: {positive} when p({positive}) >= {decision.threshold:.4f}, else the other label"


@app.command(epilog=examples(
    "llmclf evaluate --model runs/spam --data data/sms/test.csv",
    "llmclf evaluate --model runs/spam --data data/sms/test.csv --json \\",
    "    --plots runs/spam",
    "llmclf evaluate --model runs/spam-onnx --data data/sms/test.csv \\",
    "    --precision int8",
    "llmclf evaluate --zero-shot --model qwen2.5-1.5b \\",
    "    --labels \"ham=not spam,spam\" --data data/sms/test.csv",
    "llmclf evaluate --zero-shot --model qwen2.5-1.5b \\",
    "    --labels \"ham=not spam,spam\" --shots 4 --train data/sms/train.csv \\",
    "    --data data/sms/test.csv",
))
@with_zero_shot_options
def evaluate(
    model: ClfModelOpt,
    data: Annotated[Path, typer.Option("--data", "-d", help="Labelled data (CSV, TSV or JSONL).")],
    text_col: TextColOpt = "text",
    label_col: LabelColOpt = "label",
    plots: Annotated[Optional[Path], typer.Option(
        "--plots", help="Write confusion_matrix.png and calibration.png (reliability diagram) here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    decision_threshold: DecisionThresholdOpt = None,
    base_config: BaseConfigOpt = None,
    num_classes: NumClassesOpt = None,
    pooling: PoolingOverrideOpt = None,
    max_length: MaxLengthOverrideOpt = None,
    tokenizer_dir: TokenizerDirOpt = None,
    precision: PrecisionOpt = "auto",
    backend: BackendOpt = "auto",
    device: DeviceOpt = None,
    zero_shot: Optional[dict] = None,
) -> None:
    """Accuracy, per-class precision/recall/F1, macro-F1, confusion matrix, and calibration (log-loss, Brier
    score, expected calibration error: top label, 15 equal-width confidence bins) on labelled data."""
    _check_precision(precision)
    from llmclf.classifier import evaluation_report
    from llmclf.data.classification import read_labelled

    clf = _zero_shot_classifier(model, zero_shot, max_length, precision, device) if zero_shot else \
        _load_classifier(model, backend, base_config, num_classes, pooling, max_length, tokenizer_dir, precision,
                         device)
    _set_decision_threshold(clf, decision_threshold)
    metrics = evaluation_report(clf, read_labelled(data, text_col, label_col), plots_dir=plots)
    if as_json:
        typer.echo(json.dumps(metrics))
        return
    if metrics.get("multi_label"):
        from llmclf.multilabel import metrics_lines

        typer.echo("\n".join(metrics_lines(metrics)))
        return
    typer.echo(f"accuracy {metrics['accuracy'] * 100:.2f}%  macro-F1 {metrics['macro_f1']:.4f}  "
               f"n={metrics['n']}")
    typer.echo(f"log-loss {metrics['log_loss']:.4f}  Brier {metrics['brier']:.4f}  ECE {metrics['ece']:.4f} "
               f"(top label, {metrics['reliability']['bins']} bins)")
    if _decision_note(clf):
        typer.echo(_decision_note(clf))
    for label, m in metrics["per_class"].items():
        typer.echo(f"  {label:15s} precision {m['precision']:.3f}  recall {m['recall']:.3f}  f1 {m['f1']:.3f}  "
                   f"support {m['support']}")
    typer.echo("confusion matrix (rows = true, columns = predicted, order " + ", ".join(metrics["labels"]) + "):")
    for row in metrics["confusion_matrix"]:
        typer.echo("  " + " ".join(f"{v:6d}" for v in row))


@app.command(epilog=examples(
    "llmclf predict --model runs/spam \"You won a free cruise!\" \"See you\"",
    "llmclf predict --model runs/spam --input messages.csv \\",
    "    --output predictions.csv",
    "llmclf predict --model runs/imdb --mc-dropout 5 --threshold 0.6 \\",
    "    --json \"It was okay.\"",
    "llmclf predict --model runs/spam --input big.csv --output scored.csv \\",
    "    --devices 2",
    "llmclf predict --model runs/spam --explain \"You won a free cruise!\"",
    "llmclf predict --zero-shot --model smollm2-135m \\",
    "    --labels \"positive,negative\" \"What a wonderful film.\"",
    "llmclf predict --zero-shot --model qwen2.5-1.5b \\",
    "    --labels \"ham=not spam,spam\" \"You won a free cruise!\"",
))
@with_zero_shot_options
def predict(
    model: ClfModelOpt,
    texts: Annotated[Optional[list[str]], typer.Argument(help="Texts to classify.")] = None,
    input_file: Annotated[Optional[Path], typer.Option(
        "--input", "-i", help="CSV/TSV/JSONL (with --text-col) or plain text, one text per line; read in chunks, "
        "so it may be larger than memory.")] = None,
    output_file: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="Write predictions here (.csv, .tsv or .jsonl), in input order. Written as "
        "OUTPUT.partial, renamed when complete; an interrupted run resumes where it stopped when rerun.")] = None,
    text_col: TextColOpt = "text",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Texts per forward pass.")] = 32,
    chunk_size: Annotated[int, typer.Option(
        "--chunk-size", min=1, help="With --input: texts read, classified and saved per step (resume point).")] = 1024,
    restart: Annotated[bool, typer.Option(
        "--restart", help="With --input: discard an unfinished OUTPUT.partial instead of resuming it.")] = False,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="With --input: replace a finished OUTPUT (otherwise an error).")] = False,
    mc_dropout: Annotated[Optional[int], typer.Option(
        "--mc-dropout", min=1, help="Monte Carlo dropout: N forward passes with dropout on; adds the standard "
        "deviation of each probability and a `confident` flag. Default: one deterministic pass.")] = None,
    threshold: Annotated[Optional[float], typer.Option(
        "--threshold", min=0.0, max=1.0, help="A prediction is `confident` when its label's probability "
        "(mean, with --mc-dropout) reaches P. It does not change the label: see --decision-threshold.")] = None,
    decision_threshold: DecisionThresholdOpt = None,
    dropout_rate: Annotated[Optional[float], typer.Option(
        "--dropout-rate", min=0.0, max=0.99, help="With --mc-dropout: dropout probability for the passes "
        "(needed for models trained without dropout, e.g. SmolLM2).")] = None,
    seed: Annotated[Optional[int], typer.Option(
        "--seed", help="With --mc-dropout: random seed, for reproducible (and resumable) passes.")] = None,
    progress: Annotated[bool, typer.Option(
        "--progress/--no-progress", help="With --input: progress bar with texts/s on stderr.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per text.")] = False,
    explain: Annotated[bool, typer.Option(
        "--explain", help="Per-token attributions of each text (given as arguments) for its predicted label: "
        "what moved the language model's score of that label (integrated gradients; occlusion for ONNX). "
        "Costs about --explain-steps forward+backward passes per text. See docs/predict.md.")] = False,
    explain_steps: Annotated[int, typer.Option(
        "--explain-steps", min=1, max=MAX_EXPLAIN_STEPS, help="With --explain: integration points of integrated "
        "gradients (more: closer to exact, proportionally slower).")] = EXPLAIN_STEPS,
    explain_method: Annotated[str, typer.Option(
        "--explain-method", help=f"With --explain: {', '.join(EXPLAIN_METHODS)} (auto: integrated gradients, or "
        "occlusion where there are no gradients: the ONNX backend).")] = "auto",
    base_config: BaseConfigOpt = None,
    num_classes: NumClassesOpt = None,
    pooling: PoolingOverrideOpt = None,
    max_length: MaxLengthOverrideOpt = None,
    tokenizer_dir: TokenizerDirOpt = None,
    precision: PrecisionOpt = "auto",
    backend: BackendOpt = "auto",
    device: DeviceOpt = None,
    devices: DevicesOpt = None,
    max_restarts: MaxRestartsOpt = 0,
    zero_shot: Optional[dict] = None,
) -> None:
    """Classify texts given as arguments or in a file; prints or writes label and probabilities.

    With --input/--output the file is streamed and resumable: rerunning an interrupted command
    continues after the last saved chunk (no row lost or repeated); --restart starts over;
    a finished OUTPUT is only replaced with --overwrite. With --devices N (or under torchrun)
    each process classifies its share of the chunks; the output is the one-process output.
    """
    _check_precision(precision)
    from llmclf.predict import predict_file, predict_texts

    if ((devices or 1) > 1 or distributed.launched()) and input_file is None:
        raise typer.BadParameter("several processes share the chunks of an --input file; give --input and --output",
                                 param_hint="--devices")
    if relaunched(devices, max_restarts):
        return
    if distributed.launched():
        device = str(distributed.init(device))

    if not texts and input_file is None:
        raise typer.BadParameter("give texts as arguments or --input FILE")
    if texts and input_file is not None:
        raise typer.BadParameter("give texts as arguments or --input FILE, not both")
    if input_file is not None and output_file is None:
        raise typer.BadParameter("--input needs --output FILE (.csv, .tsv or .jsonl)")
    if dropout_rate is not None and mc_dropout is None:
        raise typer.BadParameter("--dropout-rate applies to --mc-dropout passes only", param_hint="--dropout-rate")
    if threshold is not None and threshold <= 0:
        raise typer.BadParameter("must be in (0, 1]", param_hint="--threshold")
    if explain and (input_file is not None or mc_dropout is not None):
        raise typer.BadParameter("explanations are for texts given as arguments, with one deterministic pass "
                                 "(no --input, no --mc-dropout)", param_hint="--explain")
    if explain_method not in EXPLAIN_METHODS:
        raise typer.BadParameter(f"choose one of {', '.join(EXPLAIN_METHODS)}", param_hint="--explain-method")
    clf = _zero_shot_classifier(model, zero_shot, max_length, precision, device) if zero_shot else \
        _load_classifier(model, backend, base_config, num_classes, pooling, max_length, tokenizer_dir, precision,
                         device)
    _set_decision_threshold(clf, decision_threshold)
    if _decision_note(clf) and not as_json and distributed.is_main():
        typer.echo(_decision_note(clf), err=True)
    if input_file is not None:
        stats = predict_file(clf, input_file, output_file, text_col=text_col, batch_size=batch_size,
                             chunk_size=chunk_size, mc_dropout=mc_dropout, threshold=threshold,
                             dropout_rate=dropout_rate, seed=seed, restart=restart, overwrite=overwrite,
                             progress=progress)
        if not distributed.is_main():
            return
        resumed = f" (resumed after {stats['resumed_from']} rows)" if stats["resumed_from"] else ""
        typer.echo(f"{stats['new_rows']} texts classified in {stats['seconds']:.1f} s "
                   f"({stats['texts_per_second']:.1f} texts/s){resumed}; {stats['rows']} rows -> {output_file}")
        return
    records = predict_texts(clf, texts, batch_size=batch_size, mc_dropout=mc_dropout, threshold=threshold,
                            dropout_rate=dropout_rate, seed=seed,
                            explain={"method": explain_method, "steps": explain_steps} if explain else None)
    for text, record in zip(texts, records, strict=True):
        if as_json:
            typer.echo(json.dumps({"text": text, **record}, ensure_ascii=False))
            continue
        if "labels" in record:  # multi-label: every label over its threshold, with its probability
            chosen = ", ".join(f"{name} {record['probabilities'][name]:.4f}" for name in record["labels"])
            typer.echo(f"{chosen}\t{text}")
            continue
        p = record["probabilities"][record["label"]]
        extra = f"\t±{record['std'][record['label']]:.4f}" if "std" in record else ""
        flag = "" if threshold is None else ("\tconfident" if record["confident"] else "\tuncertain")
        typer.echo(f"{record['label']}\t{p:.4f}{extra}{flag}\t{text}")
        if "explanation" in record:
            typer.echo(_explanation_lines(record["explanation"]))


def _explanation_lines(explanation: dict) -> str:
    """An explanation for the terminal: what it explains, then each piece of the text with its attribution."""
    e = explanation
    how = f"{e['method']}, {e['steps']} steps, delta {e['delta']:+.4f}" if e["steps"] else e["method"]
    notes = [" the label also depends on the n-gram model, not attributed"] if e["blended"] else []
    notes += [" the text was cut to the model's length: its end is not attributed"] if e["truncated"] else []
    tokens = " ".join(f"{t['text'].strip() or repr(t['text'])}({t['attribution']:+.3f})" for t in e["tokens"])
    return (f"  explains: {e['explains']}; score {e['score']:.4f}, baseline {e['baseline_score']:.4f} ({how})"
            + ";".join(notes) + f"\n  {tokens}")



@app.command(epilog=examples(
    "llmclf serve --model runs/spam   # http://127.0.0.1:8000/, API docs: /docs",
    "LLMCLF_API_KEY=\"$KEY\" llmclf serve --model runs/spam --host 0.0.0.0",
    "llmclf serve --model runs/spam-onnx --backend onnx",
    "curl -s localhost:8000/v1/classify -H 'Content-Type: application/json' \\",
    "    -d '{\"texts\": [\"You won a free cruise!\"]}'",
    "llmclf serve --zero-shot --model smollm2-135m --labels \"positive,negative\"",
    more="More: docs/serving.md and docs/security.md."))
@with_zero_shot_options
def serve(
    ctx: typer.Context,
    model: Annotated[str, typer.Option(
        "--model", "-m", help="A classifier directory written by `llmclf train` (either engine) or `llmclf export "
        "--format onnx`.")],
    host: Annotated[str, typer.Option(
        "--host", help="Address to bind; the default serves this machine only. Use 0.0.0.0 to expose it "
        "(then set an API key).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", min=0, max=65535, help="TCP port (0 = any free port).")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(
        "--api-key", envvar="LLMCLF_API_KEY", show_envvar=False, help="Require this key on /v1/* "
        "('Authorization: Bearer KEY' or 'X-API-Key: KEY'). Prefer $LLMCLF_API_KEY or --api-key-file: a key "
        "on the command line is visible to every local user in the process list.")] = None,
    api_key_file: Annotated[Optional[Path], typer.Option(
        "--api-key-file", help="Read the API key from the first line of this file (e.g. mode 600).")] = None,
    max_batch: Annotated[int, typer.Option(
        "--max-batch", min=1,
        help="Texts per forward pass: concurrent requests are merged up to this.")] = serving.MAX_BATCH,
    max_wait_ms: Annotated[float, typer.Option(
        "--max-wait-ms", min=0.0,
        help="How long a batch waits for more requests once one arrives.")] = serving.MAX_WAIT_MS,
    max_texts: Annotated[int, typer.Option(
        "--max-texts", min=1, help="Texts per request (413 beyond).")] = serving.MAX_TEXTS,
    max_chars: Annotated[int, typer.Option(
        "--max-chars", min=1, help="Characters per text (413 beyond, naming the text).")] = serving.MAX_CHARS,
    max_body_bytes: Annotated[int, typer.Option(
        "--max-body-bytes", min=1, help="Request body size (413 beyond).")] = serving.MAX_BODY_BYTES,
    max_mc_passes: Annotated[int, typer.Option(
        "--max-mc-passes", min=1,
        help="Largest mc_dropout a request may ask for (422 beyond).")] = serving.MAX_MC_PASSES,
    max_queue: Annotated[Optional[int], typer.Option(
        "--max-queue", min=1, help="Texts waiting for inference before new requests get 503 with Retry-After "
        f"[default: {serving.QUEUED_BATCHES} x --max-batch].")] = None,
    max_header_bytes: Annotated[int, typer.Option(
        "--max-header-bytes", min=1024,
        help="Request line and headers together (431 beyond).")] = serving.MAX_HEADER_BYTES,
    max_connections: Annotated[int, typer.Option(
        "--max-connections", min=1,
        help="Open connections at once; requests beyond get 503.")] = serving.MAX_CONNECTIONS,
    keep_alive_timeout: Annotated[float, typer.Option(
        "--keep-alive-timeout", min=0.1,
        help="Seconds an idle keep-alive connection stays open.")] = serving.KEEP_ALIVE_TIMEOUT,
    request_timeout: Annotated[float, typer.Option(
        "--request-timeout", min=0.1, help="Seconds a connection has to deliver a complete request (headers and "
        "body) before it is closed: bounds clients that connect and send nothing or send "
        "slowly.")] = serving.REQUEST_TIMEOUT,
    shutdown_timeout: Annotated[float, typer.Option(
        "--shutdown-timeout", min=0.1, help="On SIGTERM/SIGINT, seconds the requests in flight have to finish "
        "(new connections are refused meanwhile); a second Ctrl+C stops at once.")] = serving.SHUTDOWN_TIMEOUT,
    cors_origin: Annotated[Optional[list[str]], typer.Option(
        "--cors-origin", help="Let pages of this origin (e.g. https://app.example.com) call the API from a "
        "browser; repeat for several. Without it, no CORS headers are sent.")] = None,
    dropout_rate: Annotated[Optional[float], typer.Option(
        "--dropout-rate", min=0.0, max=0.99, help="Dropout probability for MC-dropout requests that give none "
        "(for models trained without dropout).")] = None,
    access_log: Annotated[bool, typer.Option("--access-log/--no-access-log", help="Log every request.")] = True,
    max_length: MaxLengthOverrideOpt = None,
    precision: PrecisionOpt = "auto",
    backend: BackendOpt = "auto",
    device: DeviceOpt = None,
    zero_shot: Optional[dict] = None,
) -> None:
    """Serve a trained classifier over HTTP: REST API (/v1/classify, /v1/model, /healthz), a web page
    at / and the OpenAPI docs at /docs. Concurrent requests share forward passes (micro-batching).

    Every limit below is enforced before inference; every response carries a Content-Security-Policy
    for this origin only. SIGTERM or Ctrl+C drains: requests in flight finish, then the process exits 0."""
    _check_precision(precision)
    from llmclf.classifier import load_classifier
    from llmclf.serve import create_app
    from llmclf.serve.server import exposure_warning, resolve_api_key, run_server, uvicorn_config

    # click's ParameterSource, compared by name: typer may bring its own copy of click.
    source = ctx.get_parameter_source("api_key")
    api_key, warning = resolve_api_key(api_key, source is not None and source.name == "ENVIRONMENT", api_key_file)
    if warning:
        typer.secho(warning, fg=typer.colors.YELLOW, err=True)
    clf = _zero_shot_classifier(model, zero_shot, max_length, precision, device) if zero_shot else \
        load_classifier(model, backend, max_length=max_length, precision=precision, device=device)
    clf.predict_proba(["warm-up"])  # first-call costs (allocation, kernels) before the first request
    application = create_app(clf, api_key=api_key, max_batch=max_batch, max_wait_ms=max_wait_ms,
                             max_texts=max_texts, max_body_bytes=max_body_bytes, max_mc_passes=max_mc_passes,
                             max_queue=max_queue, dropout_rate=dropout_rate, max_chars=max_chars,
                             cors_origins=cors_origin or (), shutdown_timeout=shutdown_timeout)
    config = uvicorn_config(application, host=host, port=port, access_log=access_log,
                            shutdown_timeout=shutdown_timeout, keep_alive_timeout=keep_alive_timeout,
                            request_timeout=request_timeout, max_header_bytes=max_header_bytes,
                            max_connections=max_connections)
    if warning := exposure_warning(host, api_key):
        typer.secho(warning, fg=typer.colors.YELLOW, err=True)
    typer.echo(f"serving {model} ({', '.join(clf.classes_)}) on http://{host}:{port}/  (docs: /docs"
               + (", API key required" if api_key else "") + ")", err=True)
    run_server(config)


@app.command("export", epilog=examples(
    "llmclf export --model runs/spam --format onnx --quantize int8 \\",
    "    --out runs/spam-onnx",
    "llmclf predict --model runs/spam-onnx \"You won a free cruise!\"",
    "llmclf export --model runs/spam-last --format hf --out runs/spam-hf",
))
def export_command(
    model: Annotated[str, typer.Option(
        "--model", "-m", help="The classifier directory `llmclf train` wrote (either engine).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write (must be new or empty, or --force).")],
    format: Annotated[str, typer.Option(
        "--format", "-f", help="hf: a Hugging Face Transformers directory (AutoModelForSequenceClassification, "
        "pipeline('text-classification'); decoders with --pooling last and no TF-IDF ensemble). onnx: the "
        "classifier as an ONNX graph (token ids -> probabilities) for ONNX Runtime, `--backend onnx` and other "
        "runtimes; keeps every pooling and the ensemble.")] = "onnx",
    quantize: Annotated[Optional[str], typer.Option(
        "--quantize", help="int8: also write ONNX Runtime's dynamically quantized copy (model.int8.onnx: about "
        "4x smaller and faster on CPUs, slightly less accurate; check it with `llmclf evaluate --precision "
        "int8`). ONNX only.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out directory.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print what was written as one JSON object.")] = False,
) -> None:
    """Export a trained classifier to a standard format, for use without llmclf's training code.

    The export is written beside --out and moved into place when complete: a failed export leaves
    nothing half-written. ONNX exports are checked with onnx.checker and against PyTorch (probabilities
    within 1e-4) before they are kept."""
    from llmclf.export import export_model

    report = export_model(model, out, format, quantize=quantize, force=force)
    if as_json:
        typer.echo(json.dumps(report))
        return
    for name, size in report["files"].items():
        typer.echo(f"  {name:28s} {size / 2**20:10.1f} MiB")
    if "max_abs_diff_vs_torch" in report:
        typer.echo(f"ONNX Runtime vs PyTorch: max abs difference of probabilities {report['max_abs_diff_vs_torch']:.1e}"
                   + (f" (int8: {report['int8_max_abs_diff_vs_torch']:.1e})" if quantize else ""))
    use = (f"llmclf predict --model {out} \"TEXT\"" if format == "onnx"
           else f"README.md in {out} (pipeline('text-classification', model='{out}'))")
    typer.echo(f"exported {model} as {format} to {out}/; use it: {use}")


def main() -> None:
    """Console entry point: expected errors (bad input, a full disk ...) become one line on stderr and exit
    code 1. SIGINT and SIGTERM raise `Interrupted` where the program is (cleanups run) and exit with 130
    and 143; an interrupted `train` saves its state first and prints the command that resumes it."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    # Not in torchrun's workers: its agent stops them with SIGTERM when the group ends or restarts.
    handled = [] if distributed.launched() else [
        s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not signal.SIG_IGN]
    previous = {s: signal.signal(s, raise_interrupted) for s in handled}
    try:
        distributed.recorded(_run_app)()  # a worker's traceback reaches the elastic agent's summary
    except SystemExit as exc:
        if distributed.launched() and (exc.code is None or isinstance(exc.code, int)):
            distributed.end_worker(exc.code or 0)
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        distributed.shutdown()


def _run_app() -> None:
    """`app()`, with the errors `main` expects turned into a message and an exit code (SystemExit)."""
    try:
        app()
    except TrainingInterruptedError as exc:
        argv = sys.argv[1:]
        command = shlex.join(["llmclf", *argv, *([] if "--resume" in argv else ["--resume"])])
        typer.secho(f"interrupted: {exc}. Resume with:\n  {command}", fg=typer.colors.YELLOW, err=True)
        raise SystemExit(exc.exit_code) from None
    except LlmclfError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        distributed.record_error(exc)
        raise SystemExit(1) from None
    except OSError as exc:  # one that no writer named (e.g. creating a directory): still one line, with its path
        where = f": {exc.filename}" if exc.filename is not None else ""
        typer.secho(f"error: {exc.strerror or exc}{where}", fg=typer.colors.RED, err=True)
        distributed.record_error(exc)
        raise SystemExit(1) from None
    except Interrupted as exc:
        typer.secho(f"interrupted by {signal.Signals(exc.signum).name}", fg=typer.colors.YELLOW, err=True)
        raise SystemExit(exc.exit_code) from None
