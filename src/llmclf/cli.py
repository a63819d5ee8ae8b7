"""The `llmclf` command line: thin wrappers over `llmclf.api`."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from llmclf import api
from llmclf.errors import LlmclfError
from llmclf.loaders.spec import DEFAULT_SEED
from llmclf.runtime import PRECISIONS

app = typer.Typer(
    name="llmclf",
    help="Turn pretrained language models into text classifiers: build, evaluate, train, generate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Options shared by every command that builds a model.
ModelOpt = Annotated[str, typer.Option(
    "--model", "-m", help="Preset name (gpt2-small, gpt2-medium, gpt2-large, gpt2-xl), a Hugging Face GPT-2 "
    "directory, an llmclf checkpoint directory, or a state_dict file (.pth, .safetensors) with --base-config.")]
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
    "--precision", help="auto = bfloat16 where the hardware runs it fast (AMX CPU, bf16 GPU), else float32.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, cuda:1 ... (default: auto).")]


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise typer.BadParameter(f"{precision!r} is not one of {', '.join(PRECISIONS)}", param_hint="--precision")


def _load(model: str, random_init: bool, seed: int, base_config: Optional[str], context_length: Optional[int],
          drop_rate: Optional[float], qkv_bias: Optional[bool], tokenizer_dir: Optional[Path]):
    return api.load_model(model, random_init=random_init, seed=seed, base_config=base_config,
                          context_length=context_length, drop_rate=drop_rate, qkv_bias=qkv_bias,
                          tokenizer_dir=tokenizer_dir)


@app.command()
def generate(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue.")],
    model: ModelOpt = "gpt2-small",
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
    text = api.generate_text(gpt, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_k=top_k, seed=seed, use_kv_cache=not no_kv_cache, precision=precision,
                             device=device)
    typer.echo(text)
    logging.getLogger("llmclf").info("generated in %.2f s", time.perf_counter() - start)


@app.command("lm-eval")
def lm_eval(
    text: Annotated[Path, typer.Option("--text", "-t", help="UTF-8 text file to evaluate on.")],
    model: ModelOpt = "gpt2-small",
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
    result = api.evaluate_lm(gpt, tokenizer, content, stride=stride, batch_size=batch_size,
                             train_ratio=train_ratio, seed=seed, precision=precision, device=device)
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
        return
    typer.echo(f"train loss {result.train_loss:.4f}  perplexity {result.train_perplexity:.2f}  "
               f"({result.train_batches} batches)")
    typer.echo(f"val   loss {result.val_loss:.4f}  perplexity {result.val_perplexity:.2f}  "
               f"({result.val_batches} batches)")


@app.command()
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
    history = api.pretrain(gpt, tokenizer, content, out, epochs=epochs, batch_size=batch_size, lr=lr,
                           weight_decay=weight_decay, eval_freq=eval_freq, eval_iter=eval_iter,
                           start_context=start_context, stride=stride, train_ratio=train_ratio, seed=seed,
                           precision=precision, device=device, resume=resume)
    minutes = (time.perf_counter() - start) / 60
    if history.train_losses:
        typer.echo(f"final train loss {history.train_losses[-1]:.3f}, val loss {history.val_losses[-1]:.3f}; "
                   f"{history.tokens_seen} tokens seen in {minutes:.1f} min")
    typer.echo(f"saved to {out}/ (model.safetensors, config.json, trainer_state.json, loss.png)")


def main() -> None:
    """Console entry point: expected errors become one line on stderr and exit code 1."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        app()
    except LlmclfError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise SystemExit(1) from None
