"""The command line: help, the language-model commands on a tiny model, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from llmclf.cli import app

runner = CliRunner()


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("generate", "lm-eval", "pretrain"):
        assert command in result.output
        sub = runner.invoke(app, [command, "--help"])
        assert sub.exit_code == 0 and "--model" in sub.output and "--precision" in sub.output


def test_help_paragraphs_wrap_to_the_terminal():
    # Docstrings are wrapped at 120 columns in the source; --help must reflow them, not keep those breaks.
    result = runner.invoke(app, ["predict", "--help"], env={"COLUMNS": "200"})
    assert "rerunning an interrupted command continues after the last saved chunk" in result.output


def test_generate_with_and_without_kv_cache(tiny_checkpoint):
    args = ["generate", "--model", str(tiny_checkpoint), "--prompt", "Every effort moves you",
            "--max-new-tokens", "8", "--precision", "float32"]
    cached = runner.invoke(app, args)
    uncached = runner.invoke(app, [*args, "--no-kv-cache"])
    assert cached.exit_code == 0, cached.output
    assert cached.stdout.startswith("Every effort moves you")
    assert cached.stdout == uncached.stdout


def test_lm_eval_json(tiny_checkpoint, shared_dir):
    result = runner.invoke(app, ["lm-eval", "--model", str(tiny_checkpoint), "--text",
                                 str(shared_dir / "data/the_verdict/the-verdict.txt"), "--json",
                                 "--precision", "float32", "--stride", "32", "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert set(metrics) == {"train_loss", "val_loss", "train_perplexity", "val_perplexity",
                            "train_batches", "val_batches"}
    assert 10 < metrics["train_loss"] < 11.5  # an untrained model: about ln(50257) = 10.8
    assert metrics["train_perplexity"] == pytest.approx(2.718281828 ** metrics["train_loss"], rel=1e-6)
    assert metrics["val_batches"] >= 1 and metrics["train_batches"] > metrics["val_batches"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmclf", *args], capture_output=True, text=True, timeout=120)


def test_unknown_model_lists_the_valid_names():
    result = _run("generate", "--model", "gpt5", "--prompt", "hi")
    assert result.returncode == 1
    assert "unknown model 'gpt5'" in result.stderr and "gpt2-small, gpt2-medium, gpt2-large, gpt2-xl" in result.stderr
    assert "Traceback" not in result.stderr


def test_too_short_text_exits_cleanly(tmp_path, tiny_checkpoint):
    (tmp_path / "short.txt").write_text("Just a few words.")
    result = _run("lm-eval", "--model", str(tiny_checkpoint), "--text", str(tmp_path / "short.txt"))
    assert result.returncode == 1
    assert "window(s)" in result.stderr and "Traceback" not in result.stderr


def test_bad_precision_is_rejected(tiny_checkpoint):
    result = runner.invoke(app, ["generate", "--model", str(tiny_checkpoint), "--prompt", "a", "--precision", "fp8"])
    assert result.exit_code == 2 and "fp8" in result.output


def _command_paths(command, prefix=()):
    yield prefix, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _command_paths(sub, (*prefix, name))


def test_every_help_ends_with_examples_of_that_command():
    # As git's and typer's apps do: --help ends with command lines to copy, one per line.
    import typer

    commands = {path: command for path, command in _command_paths(typer.main.get_command(app))}
    assert ("train",) in commands and ("data", "split") in commands and len(commands) == 14
    for path, command in commands.items():
        name = " ".join(("llmclf", *path))
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "80"})
        assert result.exit_code == 0 and "Examples:" in result.output, f"{name} --help has no examples"
        shown = [line.strip() for line in result.output.split("Examples:", 1)[1].splitlines()]
        examples = command.epilog.split("```")[1].strip().splitlines()
        assert any(line.startswith(f"{name} ") for line in examples), f"{name} --help: no example of {name}"
        for line in examples:  # each shown whole on its line at 80 columns, never wrapped
            assert line.strip() in shown, f"{name} --help: {line!r} is not shown as one line"
