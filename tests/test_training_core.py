"""The training core: one definition of the options (TrainArgs), the loop's parts (schedules,
clipping, parameter groups, class weights) and runs that resume exactly after SIGKILL."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from llmclf.classifier import HFClassifier, TextClassifier, load_classifier
from llmclf.cli import app
from llmclf.config import GPTConfig
from llmclf.data.classification import write_labelled
from llmclf.errors import ConfigError
from llmclf.models.gpt2 import GPTModel
from llmclf.training.args import TrainArgs
from llmclf.training.optim import class_weight_tensor, decay_parameter_names, lr_factor, make_scheduler
from tiny_classifier import tiny_dropout_lm, toy_data

runner = CliRunner()
# --- one definition of the options ------------------------------------------------------------

def test_every_option_is_a_train_flag_with_its_help_and_defaults():
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0
    for name in TrainArgs.names():
        assert TrainArgs.flag(name) in result.output, name
    assert "[default: constant scratch, linear hf]" in result.output  # per-engine defaults, from the field
    assert "never decayed" in result.output  # parameter groups stated in --help


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as err:
        TrainArgs.for_engine("scratch", epochs=0, warmup=1.0, lr_schedule="exp", class_weights="1,-2",
                             select_by="f1", trainable="some")
    message = str(err.value)
    for flag in ("--epochs", "--warmup", "--lr-schedule", "--class-weights", "--select-by", "--trainable"):
        assert flag in message
    with pytest.raises(ConfigError, match="--trainable do.*not apply to the hf engine"):
        HFClassifier("all-minilm-l6-v2", trainable="all")
    with pytest.raises(ConfigError, match="unknown training option"):
        TextClassifier("x", learning_rate=1.0)
    with pytest.raises(ConfigError, match="random_init.*scratch engine only"):
        HFClassifier("all-minilm-l6-v2", model_options={"random_init": True})


def test_engines_share_one_definition_with_their_own_defaults():
    scratch, hf = TrainArgs.for_engine("scratch"), TrainArgs.for_engine("hf")
    assert (scratch.lr_schedule, scratch.max_grad_norm, scratch.weight_decay) == ("constant", 0.0, 0.1)
    assert (hf.lr_schedule, hf.max_grad_norm, hf.weight_decay) == ("linear", 1.0, 0.0)
    assert set(TrainArgs.names("hf")) < set(TrainArgs.names("scratch")) == {f.name for f in
                                                                           dataclasses.fields(TrainArgs)}
    assert TextClassifier("m").get_params()["epochs"] == 7 and HFClassifier("m").get_params()["epochs"] == 3
    ensembles = TextClassifier("m").get_params()["ensemble"], HFClassifier("m").get_params()["ensemble"]
    assert ensembles == ("tfidf+all-minilm-l6-v2", "none")


def test_estimators_clone_like_scikit_learn():
    from sklearn.base import clone

    clf = TextClassifier("gpt2-small", epochs=2, class_weights="balanced", model_options={"random_init": True})
    copy = clone(clf)
    assert copy is not clf and copy.get_params() == clf.get_params()
    assert copy.set_params(lr=1e-4) is copy and copy.lr == 1e-4 and clf.lr == 1e-3
    with pytest.raises(ConfigError):
        copy.set_params(nonsense=1)
    hf = clone(HFClassifier("all-minilm-l6-v2", select_by="loss"))
    assert hf.select_by == "loss" and hf.engine == "hf"


# --- the loop's parts ---------------------------------------------------------------------------

@pytest.mark.parametrize("schedule, hf_name", [("constant", "constant_with_warmup"), ("linear", "linear"),
                                               ("cosine", "cosine")])
def test_learning_rate_schedules_match_transformers(schedule, hf_name):
    from transformers import get_scheduler

    total, warmup = 40, 0.1
    optimizers = [torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0) for _ in range(2)]
    ours = make_scheduler(optimizers[0], total, warmup, schedule)
    theirs = get_scheduler(hf_name, optimizers[1], num_warmup_steps=4, num_training_steps=total)
    for _ in range(total):
        assert ours.get_last_lr()[0] == pytest.approx(theirs.get_last_lr()[0], abs=1e-12)
        for optimizer in optimizers:
            optimizer.step()
        ours.step()
        theirs.step()
    assert lr_factor(0, total, 0, "constant") == 1.0 and lr_factor(39, total, 4, "linear") > 0


def test_weight_decay_skips_biases_norms_and_embeddings():
    model = GPTModel(GPTConfig(vocab_size=100, context_length=16, emb_dim=16, n_heads=2, n_layers=1, qkv_bias=True))
    decayed = decay_parameter_names(model)
    assert "trf_blocks.0.att.W_query.weight" in decayed and "out_head.weight" in decayed
    for name, _ in model.named_parameters():
        if name.endswith("bias") or "norm" in name or "emb" in name:
            assert name not in decayed, name


def test_balanced_class_weights_are_scikit_learns():
    from sklearn.utils.class_weight import compute_class_weight

    labels = [0] * 30 + [1] * 5 + [2] * 10
    expected = compute_class_weight("balanced", classes=np.arange(3), y=np.array(labels))
    np.testing.assert_allclose(class_weight_tensor("balanced", labels, 3).numpy(), expected, rtol=1e-6)
    assert class_weight_tensor("none", labels, 3) is None
    assert class_weight_tensor("1,2,3", labels, 3).tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ConfigError, match="2 class weight.*for 3 classes"):
        class_weight_tensor("1,2", labels, 3)
    with pytest.raises(ConfigError, match="positive"):
        class_weight_tensor("1,0,2", labels, 3)


def test_class_weights_clipping_and_schedule_change_training(tiny_checkpoint, monkeypatch):
    data = toy_data(24, pos_every=4)  # 6 pos, 18 neg
    base = dict(trainable="all", epochs=2, lr=3e-3, batch_size=4, precision="float32", log_every=1000, ensemble="none")

    def probs(**options):
        return TextClassifier(str(tiny_checkpoint), **base, **options).fit(data, data, progress=False) \
            .predict_proba(data.texts[:4])

    clips = []
    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda p, n: clips.append(n) or real_clip(p, n))
    plain = probs()
    assert clips == []  # the course's loop: no clipping by default
    clipped = probs(max_grad_norm=0.01)
    assert clips and set(clips) == {0.01}
    for changed in (clipped, probs(class_weights="balanced"), probs(lr_schedule="cosine", warmup=0.3)):
        assert not np.allclose(plain, changed, atol=1e-6)
    with pytest.raises(ConfigError, match="3 class weight"):
        TextClassifier(str(tiny_checkpoint), **base, class_weights="1,2,3").fit(data, data, progress=False)


# --- checkpoints and exact resume ----------------------------------------------------------------

@pytest.fixture(scope="module")
def run_files(tmp_path_factory, tokenizer):
    """A tiny GPT-2 with dropout (so the RNG state matters) and toy train/validation CSV files."""
    tmp_path = tmp_path_factory.mktemp("runs")
    lm = tiny_dropout_lm(tmp_path / "lm", tokenizer)
    write_labelled(toy_data(40, pos_every=3), tmp_path / "train.csv")
    write_labelled(toy_data(12, offset=100), tmp_path / "val.csv")
    return tmp_path, lm


# 40 texts / batch 4 = 10 batches an epoch, 2 per step: 5 optimizer steps an epoch, 15 in all
RUN_ARGS = ["--trainable", "all", "--epochs", "3", "--batch-size", "4", "--grad-accum", "2", "--lr", "3e-3",
            "--lr-schedule", "cosine", "--warmup", "0.2", "--max-grad-norm", "0.5", "--class-weights", "balanced",
            "--log-every", "2", "--eval-iter", "2", "--precision", "float32", "--save-every", "3"]


def _train_command(files: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    tmp, lm = files
    return [sys.executable, "-m", "llmclf", "train", "--model", str(lm), "--train", str(tmp / "train.csv"),
            "--val", str(tmp / "val.csv"), "--out", str(out), "--no-progress", *RUN_ARGS, *extra]


def _run(command: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"LLMCLF_FAULT": fault} if fault else {})}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def _same_run(a: Path, b: Path) -> None:
    """Identical weights (float32, bit for bit), metrics log and history."""
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()
    assert json.loads((a / "history.json").read_text()) == json.loads((b / "history.json").read_text())
    assert not (a / "checkpoints").exists() and not (b / "checkpoints").exists()


@pytest.fixture(scope="module")
def uninterrupted(run_files):
    out = run_files[0] / "whole"
    done = _run(_train_command(run_files, out))
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.parametrize("fault, damage_newest", [
    ("step:7", False),  # killed mid-epoch 2, one step after the state of step 6: step 7 is redone
    ("save:6", False),  # killed halfway through writing the state of step 6: step 5's is used
    ("step:7", True),   # the newest state is found truncated: the one before it is used, and said so
])
def test_sigkilled_run_resumes_to_the_same_model(run_files, uninterrupted, fault, damage_newest, tmp_path):
    out = tmp_path / "killed"
    killed = _run(_train_command(run_files, out), fault=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    states = sorted((out / "checkpoints").glob("state-*.pt"))
    assert states and not (out / "model.safetensors").exists()
    if damage_newest:
        with open(states[-1], "r+b") as f:
            f.truncate(states[-1].stat().st_size // 3)
    resumed = _run(_train_command(run_files, out, "--resume", "--progress"))  # --progress may differ
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    if damage_newest:
        assert f"{states[-1].name} is damaged" in resumed.stderr and f"resuming from {states[-2].name}" in \
            resumed.stderr
    _same_run(uninterrupted, out)


def test_killed_before_its_first_state_starts_over_with_a_fresh_metrics_log(run_files, uninterrupted, tmp_path):
    """What the killed process logged is not kept when there is no state to resume from (as a restarted
    torchrun group does, and --resume)."""
    out = tmp_path / "killed"
    killed = _run(_train_command(run_files, out), fault="step:1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not list((out / "checkpoints").glob("state-*.pt")) and (out / "metrics.jsonl").read_text()
    resumed = _run(_train_command(run_files, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    _same_run(uninterrupted, out)


def test_killed_at_an_arbitrary_moment_resumes_to_the_same_model(run_files, uninterrupted, tmp_path):
    out = tmp_path / "killed"
    env = dict(os.environ)
    process = subprocess.Popen(_train_command(run_files, out), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((out / "checkpoints").glob("state-*.pt")) and process.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)  # whatever it was doing (training, evaluating, writing a state)
    process.wait()
    resumed = _run(_train_command(run_files, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    _same_run(uninterrupted, out)


def test_resume_refuses_what_it_cannot_continue(run_files, tmp_path):
    import shutil

    tmp = tmp_path
    for name in ("train.csv", "val.csv"):
        shutil.copy(run_files[0] / name, tmp / name)
    run_files = (tmp, run_files[1])
    empty = tmp / "empty"
    empty.mkdir()
    (tmp / "foreign").mkdir()
    (tmp / "foreign" / "notes.txt").write_text("not a run")
    for directory in (empty, tmp / "foreign", tmp / "missing"):
        failed = _cli(_train_command(run_files, directory, "--resume")[3:])
        assert failed.exit_code == 1 and "nothing to resume" in failed.output, failed.output

    killed = tmp / "killed"
    assert _run(_train_command(run_files, killed), fault="step:4").returncode == -signal.SIGKILL
    again = _cli(_train_command(run_files, killed)[3:])  # a fresh start would discard the interrupted run
    assert again.exit_code == 1 and "unfinished training run" in again.output and "--resume" in again.output
    changed = _cli(_train_command(run_files, killed, "--resume", "--lr", "1e-3", "--seed", "5")[3:])
    assert changed.exit_code == 1 and "lr 0.003 (now 0.001)" in changed.output and "seed" in changed.output
    write_labelled(toy_data(40, offset=7), tmp / "train.csv")
    other_data = _cli(_train_command(run_files, killed, "--resume")[3:])
    assert other_data.exit_code == 1 and "train data (its checksum differs)" in other_data.output
    assert list((killed / "checkpoints").glob("state-*.pt"))  # refusals lose nothing


def test_resume_of_a_finished_run_says_so_and_loads_it(run_files, uninterrupted):
    tmp, _ = run_files
    before = (uninterrupted / "model.safetensors").read_bytes()
    done = _cli([*_train_command(run_files, uninterrupted, "--resume")[3:], "--test", str(tmp / "val.csv")])
    assert done.exit_code == 0, done.output
    assert "already finished" in done.output and "test" in done.output
    assert (uninterrupted / "model.safetensors").read_bytes() == before
    config = json.loads((uninterrupted / "config.json").read_text())
    assert config["training"]["lr_schedule"] == "cosine" and config["run"]["data"]["train"]
    assert load_classifier(uninterrupted).class_weights == "balanced"


def _cli(args: list[str]):
    import logging

    logging.basicConfig(level=logging.INFO, force=True)  # the CLI's main() does this
    from llmclf.errors import LlmclfError

    result = runner.invoke(app, args)
    if isinstance(result.exception, LlmclfError):  # what main() prints before exiting with 1
        result = _Outcome(1, result.output + f"error: {result.exception}")
    return result


@dataclasses.dataclass
class _Outcome:
    exit_code: int
    output: str
