"""Fine-tuning into a classifier: data, pooling, trainable layers, caching, API contract, CLI."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from llmclf.classifier import NotFittedError, TextClassifier, load_classifier
from llmclf.cli import app
from llmclf.config import GPTConfig
from llmclf.data.classification import (
    EncodedTexts,
    LabelledTexts,
    label_order,
    parse_label_names,
    prepare_sms_spam,
    read_labelled,
    read_sms_spam,
    split_labelled,
    write_labelled,
)
from llmclf.errors import ConfigError, DataError
from llmclf.loaders.checkpoint import save_checkpoint
from llmclf.models.gpt2 import GPTModel
from llmclf.models.heads import SequenceClassifier, Trainable, apply_trainable, pool, replace_head
from llmclf.training.classifier import Batches, calc_loss_and_accuracy, calc_loss_batch

runner = CliRunner()


@pytest.fixture(scope="module")
def sms_split(tmp_path_factory, shared_dir):
    out = tmp_path_factory.mktemp("sms")
    counts = prepare_sms_spam(out, shared_dir / "data/sms_spam/sms_spam_collection.zip")
    return out, counts


def test_sms_spam_reads_all_messages_and_splits_like_the_course(sms_split, shared_dir):
    frame = read_sms_spam(shared_dir / "data/sms_spam/SMSSpamCollection")
    assert len(frame) == 5574 and (frame["label"] == "spam").sum() == 747
    out, counts = sms_split
    assert [counts[s]["rows"] for s in ("train", "validation", "test")] == [1045, 149, 300]
    assert sum(counts[s].get("spam", 0) for s in counts) == 747
    train = read_labelled(out / "train.csv")
    assert label_order(train.labels) == ["ham", "spam"] and len(train) == 1045


def test_any_labelled_format_and_split(tmp_path):
    rows = [{"review": f"text number {i}", "stars": str(i % 3 + 1)} for i in range(60)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = read_labelled(tmp_path / "d.jsonl", text_col="review", label_col="stars")
    assert label_order(data.labels) == ["1", "2", "3"]
    train, val, test = split_labelled(data, (0.5, 0.25, 0.25), stratify=True, seed=1)
    assert (len(train), len(val), len(test)) == (30, 15, 15)
    assert sorted(test.labels).count("1") == 5
    assert label_order(["10", "9", "2"]) == ["2", "9", "10"]
    with pytest.raises(DataError, match="no column 'text'"):
        read_labelled(tmp_path / "d.jsonl")
    (tmp_path / "bad.csv").write_text("text,label\nhello,\n")
    with pytest.raises(DataError, match="row 2: the label is missing"):
        read_labelled(tmp_path / "bad.csv")


def test_a_zero_share_gives_the_usual_80_20_split(tmp_path, shared_dir):
    from sklearn.model_selection import train_test_split

    data = read_labelled(shared_dir / "data/imdb/imdb_train_1000_balanced.csv")
    train, val, test = split_labelled(data, (0.8, 0.2, 0.0), seed=42)
    assert (len(train), len(val), len(test)) == (800, 200, 0)
    _, expected = train_test_split(data.texts, test_size=0.2, random_state=42)  # the course's split
    assert val.texts == expected
    result = runner.invoke(app, ["data", "split", str(shared_dir / "data/imdb/imdb_train_1000_balanced.csv"),
                                 "--out", str(tmp_path), "--ratios", "0.8,0.2,0", "--seed", "42"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.csv", "validation.csv"]
    with pytest.raises(DataError, match="too few"):
        split_labelled(LabelledTexts(["a", "b"], ["x", "y"]), (0.5, 0.3, 0.2))


def test_label_names_rename_integer_labels(tmp_path, shared_dir):
    source = str(shared_dir / "data/imdb/imdb_train_1000_balanced.csv")
    result = runner.invoke(app, ["data", "split", source, "--out", str(tmp_path), "--ratios", "0.8,0.2,0",
                                 "--seed", "42", "--label-names", "0=negative, 1=positive"])
    assert result.exit_code == 0, result.output
    original = split_labelled(read_labelled(source), (0.8, 0.2, 0.0), seed=42)[1]
    renamed = read_labelled(tmp_path / "validation.csv")
    assert renamed.texts == original.texts  # the same split, only the labels renamed
    assert renamed.labels == [{"0": "negative", "1": "positive"}[label] for label in original.labels]

    result = runner.invoke(app, ["data", "split", source, "--out", str(tmp_path / "x"), "--label-names", "0=negative"])
    assert isinstance(result.exception, DataError) and "'1' without a name" in str(result.exception)
    assert not (tmp_path / "x").exists()
    for bad in ("0=negative,0=positive", "negative", "0=,1=positive"):
        with pytest.raises(DataError, match="OLD=NEW"):
            parse_label_names(bad)


def test_pooling_finds_the_last_real_token_on_either_side():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).view(2, 4, 1)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert pool(hidden, right, "last").flatten().tolist() == [1.0, 7.0]
    assert pool(hidden, left, "last").flatten().tolist() == [3.0, 7.0]
    assert pool(hidden, right, "mean").flatten().tolist() == [0.5, 5.5]
    assert pool(hidden, right, "last-position").flatten().tolist() == [3.0, 7.0]


@pytest.mark.parametrize(("spec", "expected_blocks"), [("head", []), ("last-block", [1]), ("last-n:2", [0, 1])])
def test_trainable_strategies(tiny_model, spec, expected_blocks):
    clf = SequenceClassifier(replace_head(tiny_model, 3))
    n = apply_trainable(clf, Trainable.parse(spec))
    head = 32 * 3 + 3
    per_block = sum(p.numel() for p in clf.backbone.trf_blocks[0].parameters())
    norm = 64 if expected_blocks else 0
    assert n == head + per_block * len(expected_blocks) + norm
    for i, block in enumerate(clf.backbone.trf_blocks):
        assert all(p.requires_grad == (i in expected_blocks) for p in block.parameters())
    assert not clf.backbone.tok_emb.weight.requires_grad


def test_lora_trains_adapters_only_and_merges_back(tiny_model):
    clf = SequenceClassifier(replace_head(tiny_model, 2))
    n = apply_trainable(clf, Trainable.parse("lora:4:8"))
    trainable = [name for name, p in clf.named_parameters() if p.requires_grad]
    assert all(".lora." in name or "out_head" in name for name in trainable)
    assert n > 0
    with torch.no_grad():
        for name, p in clf.named_parameters():
            if name.endswith("lora.B"):
                p.normal_()
    x = torch.randint(0, 50000, (2, 7))
    before = clf(x, torch.ones_like(x))
    from llmclf.models.heads import merge_lora

    merge_lora(clf)
    assert not any("lora" in name for name in clf.backbone.state_dict())
    torch.testing.assert_close(clf(x, torch.ones_like(x)), before, atol=1e-5, rtol=1e-4)
    with pytest.raises(ConfigError, match="unknown --trainable"):
        Trainable.parse("some")


@pytest.mark.parametrize("pooling", ["last", "mean", "last-position"])
def test_cached_frozen_layers_give_the_uncached_logits_and_loss(tiny_model, pooling):
    clf = SequenceClassifier(replace_head(tiny_model, 2), pooling)
    apply_trainable(clf, Trainable.parse("last-block"))
    rng = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 50000, (n,), generator=rng).tolist() for n in (3, 9, 5, 12, 1, 7)]
    data = EncodedTexts(ids, [0, 1, 1, 0, 1, 0], 0)
    fixed = 12 if pooling == "last-position" else None
    plain = Batches(clf, data, 4, 50256, fixed, torch.device("cpu"), torch.float32)
    cached = Batches(clf, data, 4, 50256, fixed, torch.device("cpu"), torch.float32, cache_from=1)
    for a, b in zip(plain.iterate(), cached.iterate(), strict=True):
        torch.testing.assert_close(calc_loss_batch(clf, plain, a), calc_loss_batch(clf, cached, b),
                                   atol=1e-5, rtol=1e-5)
    assert calc_loss_and_accuracy(clf, plain) == pytest.approx(calc_loss_and_accuracy(clf, cached), abs=1e-5)


def _six_block_classifier(tiny_cfg: GPTConfig, pooling: str) -> SequenceClassifier:
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny_cfg, n_layers=6)
    return SequenceClassifier(replace_head(GPTModel(cfg).eval(), 2), pooling)


def test_mean_blocks_pooling_averages_the_normed_mean_of_blocks_from_a_third_of_the_depth(tiny_cfg):
    clf = _six_block_classifier(tiny_cfg, "mean-blocks")
    ids = torch.randint(0, 50000, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0  # padding is not averaged
    backbone = clf.backbone
    x, inputs = backbone.embed(ids, mask)
    per_block = []
    for layer, block in enumerate(backbone.trf_blocks):
        x = block(x, inputs, None, layer)
        per_block.append(pool(backbone.final_norm(x), mask, "mean"))
    assert list(clf.pooled_blocks) == [2, 3, 4, 5]
    expected = backbone.out_head(torch.stack(per_block[2:]).mean(0))
    torch.testing.assert_close(clf(ids, mask), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, backbone.out_head(per_block[-1]), atol=1e-3)  # not the last block alone
    with pytest.raises(ValueError, match="reads blocks 3-6"):
        clf(x, mask, start=4)  # states after block 4 miss blocks 3 and 4


@pytest.mark.parametrize("pooling", ["last", "mean", "mean-blocks"])
@pytest.mark.parametrize("stop", [1, 4])
def test_one_pass_gives_the_states_and_the_heads_features(tiny_cfg, pooling, stop):
    """tune's frozen pass keeps the states it caches and the head's features (mean-blocks reads blocks on
    both sides of block 4)."""
    clf = _six_block_classifier(tiny_cfg, pooling)
    ids = torch.randint(0, 50000, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    states, features = clf.states_and_features(ids, mask, stop)
    torch.testing.assert_close(states, clf.prefix_states(ids, mask, stop))
    torch.testing.assert_close(features, clf.prefix_states(ids, mask, clf.features_start), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(clf.backbone.out_head(features[:, 0]), clf(ids, mask), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("pooling", ["last", "mean", "mean-blocks", "last-position"])
@pytest.mark.parametrize("trainable", ["head", "last-n:2"])
def test_frozen_cache_points_give_the_uncached_logits_and_loss(tiny_cfg, pooling, trainable):
    """What `train` caches (the head's features when only it trains, else states no later than the first
    block the head reads) gives the logits of the whole model run on token ids."""
    clf = _six_block_classifier(tiny_cfg, pooling)
    first = Trainable.parse(trainable).first_trainable_block(6)
    point = clf.cache_point(first)
    assert point == (clf.features_start if trainable == "head" else 2 if pooling == "mean-blocks" else 4)
    rng = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 50000, (n,), generator=rng).tolist() for n in (3, 9, 5, 12, 1, 7)]
    data = EncodedTexts(ids, [0, 1, 1, 0, 1, 0], 0)
    fixed = 12 if pooling == "last-position" else None
    plain = Batches(clf, data, 4, 50256, fixed, torch.device("cpu"), torch.float32)
    cached = Batches(clf, data, 4, 50256, fixed, torch.device("cpu"), torch.float32, cache_from=point)
    if trainable == "head":
        assert {tuple(s.shape) for s in cached.states} == {(1, 32)}  # one vector per text
    order = plain.order()
    for a, b in zip(plain.iterate(order=order), cached.iterate(order=order), strict=True):
        torch.testing.assert_close(calc_loss_batch(clf, plain, a), calc_loss_batch(clf, cached, b),
                                   atol=1e-5, rtol=1e-5)


@pytest.fixture
def tiny_lm(tmp_path, tokenizer):
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "lm", GPTModel(GPTConfig(context_length=64, emb_dim=32, n_heads=4,
                                                                n_layers=2)), tokenizer)


def _toy_data(n: int = 48) -> LabelledTexts:
    words = {"pos": "great wonderful happy", "neg": "awful terrible sad"}
    labels = ["pos" if i % 2 else "neg" for i in range(n)]
    return LabelledTexts([f"item {i}: {words[lab]}" for i, lab in enumerate(labels)], labels, "toy")


def test_fit_learns_saves_and_reloads(tmp_path, tiny_lm):
    data = _toy_data()
    clf = TextClassifier(str(tiny_lm), trainable="all", epochs=4, lr=3e-3, batch_size=8, log_every=3,
                         precision="float32")
    with pytest.raises(NotFittedError):
        clf.predict(["x"])
    assert clf.fit(data, data, out_dir=tmp_path / "clf", progress=False) is clf
    assert clf.classes_ == ["neg", "pos"]
    assert clf.evaluate(data)["accuracy"] == 1.0
    probs = clf.predict_proba(["great wonderful happy", "awful terrible sad", "great"])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert clf.predict(["great wonderful happy", "awful terrible sad"]) == ["pos", "neg"]

    out = tmp_path / "clf"
    for name in ("model.safetensors", "config.json", "metrics.jsonl", "history.json", "loss.png", "accuracy.png"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["labels"] == ["neg", "pos"] and config["pooling"] == "mean" and config["pad_id"] == 50256
    reloaded = load_classifier(out, precision="float32")
    np.testing.assert_allclose(reloaded.predict_proba(["great", "sad day"]), clf.predict_proba(["great", "sad day"]),
                               atol=1e-6)
    events = [json.loads(line)["event"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert events.count("epoch") == 4 and "eval" in events and "step" in events


def test_fit_reports_the_validation_metrics_that_evaluate_gives(tiny_lm):
    # fit computes them from its cached validation states instead of another full pass
    data = _toy_data()
    val = LabelledTexts(["great", "sad day", "item: awful", "wonderful happy", "terrible", "fine"],
                        ["pos", "neg", "neg", "pos", "neg", "pos"], "val")
    clf = TextClassifier(str(tiny_lm), trainable="last-block", epochs=1, precision="float32").fit(data, val,
                                                                                                  progress=False)
    expected = clf.evaluate(val)
    assert clf.val_metrics_["confusion_matrix"] == expected["confusion_matrix"]
    assert clf.val_metrics_["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert clf.val_metrics_["n"] == 6


def test_a_template_wraps_every_text_in_training_and_after_reloading(tmp_path, tiny_lm):
    data = _toy_data()
    with pytest.raises(ConfigError, match="template must contain {text}"):
        TextClassifier(str(tiny_lm), template="Message:").fit(data, data, progress=False)
    path = tmp_path / "data.csv"
    write_labelled(data, path)
    result = runner.invoke(app, ["train", "--model", str(tiny_lm), "--train", str(path), "--val", str(path),
                                 "--out", str(tmp_path / "bad"), "--template", "no placeholder"])
    assert isinstance(result.exception, ConfigError) and "template must contain {text}" in str(result.exception)
    result = runner.invoke(app, ["train", "--model", str(tiny_lm), "--train", str(path), "--val", str(path),
                                 "--out", str(tmp_path / "clf"), "--epochs", "1", "--precision", "float32",
                                 "--template", "SMS: {text}\\nSpam?", "--ensemble", "none"])
    assert result.exit_code == 0, result.output
    clf = load_classifier(tmp_path / "clf", precision="float32")
    assert clf.template == "SMS: {text}\nSpam?"
    tokenizer = clf.tokenizer_
    wrapped = clf._encode(LabelledTexts(["great day"], []), with_labels=False).ids[0]
    assert wrapped == tokenizer.encode("SMS: great day\nSpam?")
    templated = clf.predict_proba(["great day", "sad"])
    clf.template_ = None  # the fitted template (the option as filled in)
    assert not np.allclose(clf.predict_proba(["great day", "sad"]), templated)


def test_same_seed_same_result(tiny_lm):
    """Same seed, same trained head (the blend and the temperature: test_calibration.py's same-seed test)."""
    data = _toy_data(24)

    def run() -> np.ndarray:
        clf = TextClassifier(str(tiny_lm), epochs=1, lr=1e-3, precision="float32", log_every=100, ensemble="none",
                             calibration="none")
        return clf.fit(data, data, progress=False).predict_proba(data.texts)

    np.testing.assert_array_equal(run(), run())


def test_book_classifier_checkpoint_gives_classify_reviews_probabilities(tmp_path, tiny_cfg, tokenizer,
                                                                          gpt2_tokenizer_dir):
    ch04 = pytest.importorskip("llms_from_scratch.ch04")
    torch.manual_seed(5)
    book = ch04.GPTModel(tiny_cfg.to_dict()).eval()
    book.out_head = torch.nn.Linear(tiny_cfg.emb_dim, 2)
    torch.save(book.state_dict(), tmp_path / "review_classifier.pth")
    (tmp_path / "cfg.json").write_text(json.dumps(tiny_cfg.to_dict()))
    clf = load_classifier(tmp_path / "review_classifier.pth", base_config=str(tmp_path / "cfg.json"), num_classes=2,
                          pooling="last-position", max_length=20, precision="float32", tokenizer_dir=gpt2_tokenizer_dir)
    texts = ["You are a winner you have been specially selected to receive $1000 cash or a $2000 award.",
             "Hey, just wanted to check if we're still on for dinner tonight? Let me know!"]
    for text, probs in zip(texts, clf.predict_proba(texts), strict=True):
        ids = tokenizer.encode(text)[:20]  # the book's classify_review, with its logits kept
        ids += [50256] * (20 - len(ids))
        with torch.no_grad():
            expected = torch.softmax(book(torch.tensor([ids]))[:, -1, :], dim=-1)[0].numpy()
        np.testing.assert_allclose(probs, expected, atol=1e-5)


def test_train_evaluate_predict_cli(tmp_path, tiny_lm, sms_split):
    out_data, _ = sms_split
    out = tmp_path / "spam"
    result = runner.invoke(app, ["train", "--model", str(tiny_lm), "--train", str(out_data / "validation.csv"),
                                 "--val", str(out_data / "validation.csv"), "--test", str(out_data / "test.csv"),
                                 "--out", str(out), "--epochs", "1", "--lr", "1e-3", "--precision", "float32",
                                 "--trainable", "last-n:1", "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert metrics["test"]["n"] == 300 and 0 <= metrics["test"]["accuracy"] <= 1
    assert (out / "confusion_matrix.png").is_file() and (out / "test_metrics.json").is_file()

    ev = runner.invoke(app, ["evaluate", "--model", str(out), "--data", str(out_data / "test.csv"), "--json"])
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.stdout)["accuracy"] == pytest.approx(metrics["test"]["accuracy"], abs=0.01)

    pred = runner.invoke(app, ["predict", "--model", str(out), "--json", "You are a winner", "See you at dinner"])
    lines = [json.loads(line) for line in pred.stdout.strip().splitlines()]
    assert [set(x["probabilities"]) for x in lines] == [{"ham", "spam"}] * 2

    (tmp_path / "in.txt").write_text("first text\nsecond text\nthird\n")
    runner.invoke(app, ["predict", "--model", str(out), "--input", str(tmp_path / "in.txt"),
                        "--output", str(tmp_path / "out.csv")])
    written = (tmp_path / "out.csv").read_text().splitlines()
    assert written[0] == "text,label,p_ham,p_spam" and [w.split(",")[0] for w in written[1:]] == [
        "first text", "second text", "third"]


def test_length_bucketing_keeps_every_text_once_and_groups_similar_lengths():
    import random

    from llmclf.data.classification import batch_order

    lengths = [random.Random(i).randint(1, 200) for i in range(1000)]
    batches = batch_order(lengths, 8, shuffle=True, bucket=True, rng=random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(1000))
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches])
    plain = batch_order(lengths, 8, shuffle=True, bucket=False, rng=random.Random(0))
    assert spread < 0.2 * np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in plain])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 300), max_size=80), st.integers(1, 40))
def test_inference_batches_cover_every_text_once_and_bound_the_padding(lengths, batch_size):
    from llmclf.data.classification import PADDING_SLACK, inference_batches

    batches = inference_batches(lengths, batch_size)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert 1 <= len(batch) <= batch_size
        real = sum(lengths[i] for i in batch)
        assert len(batch) * max(lengths[i] for i in batch) <= (1 + PADDING_SLACK) * real + 1e-9
    # equal lengths: full batches, as plain sorting gives
    assert [len(b) for b in inference_batches([7] * 70, 32)] == [32, 32, 6]


def test_bfloat16_training_runs_and_learns(tiny_lm):
    data = _toy_data()
    clf = TextClassifier(str(tiny_lm), trainable="all", epochs=4, lr=3e-3, precision="bfloat16", bucket=True,
                         log_every=100, ensemble="none").fit(data, data, progress=False)
    assert clf.evaluate(data)["accuracy"] >= 0.9


def test_gradient_accumulation_equals_the_larger_batch(tiny_lm):
    data = _toy_data()

    def run(batch_size: int, grad_accum: int) -> np.ndarray:
        clf = TextClassifier(str(tiny_lm), trainable="all", epochs=2, lr=1e-3, batch_size=batch_size,
                             grad_accum=grad_accum, precision="float32", log_every=1000, ensemble="none")
        return clf.fit(data, data, progress=False).predict_proba(data.texts)

    np.testing.assert_allclose(run(4, 2), run(8, 1), atol=1e-5)


def test_patience_stops_early_and_keeps_the_best_epoch(tiny_lm):
    data = _toy_data(16)
    clf = TextClassifier(str(tiny_lm), epochs=10, lr=0.0, patience=2, precision="float32", log_every=1000,
                         ensemble="none")
    history = clf.fit(data, data, progress=False).history_
    assert history.stopped_early and len(history.val_accuracy_full) == 3 and history.best_epoch == 1


# (loss, accuracy, macro-F1) of the full validation evaluation after each of 4 epochs
SCRIPTED_EVALUATIONS = [(0.5, 0.9, 0.90), (0.3, 0.9, 0.89), (0.4, 0.9, 0.95), (0.2, 0.8, 0.80)]


@pytest.mark.parametrize("select_by, best_epoch", [("accuracy", 2), ("macro-f1", 3), ("loss", 4)])
def test_select_by_picks_the_best_evaluation_ties_broken_by_loss(tiny_lm, monkeypatch, select_by, best_epoch):
    import llmclf.training.classifier as training

    evaluations = iter(SCRIPTED_EVALUATIONS)

    def scripted(model, batches):
        loss, accuracy, macro_f1 = next(evaluations)
        return {"loss": loss, "accuracy": accuracy, "macro_f1": macro_f1}

    monkeypatch.setattr(training, "evaluate_batches", scripted)
    data = _toy_data(16)
    history = TextClassifier(str(tiny_lm), epochs=4, precision="float32", log_every=1000, ensemble="none",
                             select_by=select_by).fit(data, data, progress=False).history_  # no blend: folds evaluate
    # accuracy ties at 0.9 for epochs 1-3: the lowest loss among them (epoch 2) wins
    assert history.best_epoch == best_epoch and history.val_loss_full == [0.5, 0.3, 0.4, 0.2]


def test_tsv_input_and_jsonl_output(tmp_path, tiny_lm):
    from llmclf.predict import predict_file

    data = _toy_data(16)
    clf = TextClassifier(str(tiny_lm), epochs=1, precision="float32", ensemble="none").fit(data, data, progress=False)
    (tmp_path / "in.tsv").write_text("id\tmessage\n" + "".join(f"{i}\t{t}\n" for i, t in enumerate(data.texts)))
    stats = predict_file(clf, tmp_path / "in.tsv", tmp_path / "out.jsonl", text_col="message", chunk_size=5)
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert stats["rows"] == 16 and [r["message"] for r in rows] == data.texts
    assert [r["label"] for r in rows] == clf.predict(data.texts)
    with pytest.raises(DataError, match="no column 'text'"):
        predict_file(clf, tmp_path / "in.tsv", tmp_path / "out2.jsonl")
    assert not (tmp_path / "out2.jsonl").exists()  # nothing half-written


def assert_one_position_head_matches_the_full_forward(backbone: torch.nn.Module) -> None:
    """The classifier's last block finishes only the pooled rows; its logits must equal reading the
    pooled rows of the full forward (every position through every block), as the course does."""
    rng = torch.Generator().manual_seed(1)
    ids = torch.randint(0, backbone.tok_emb.num_embeddings, (3, 7), generator=rng)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1, 1]])  # right, left
    for pooling, attn in (("last", mask), ("last-position", None)):
        clf = SequenceClassifier(replace_head(backbone, 2), pooling).eval()
        with torch.no_grad():
            full = clf.backbone.out_head(pool(clf.backbone.hidden_states(ids, attn), attn, pooling))
            torch.testing.assert_close(clf(ids, mask), full, atol=1e-5, rtol=1e-5)
            # blocks 1: from cached states, as training with cached frozen layers runs them
            x, inputs = clf.backbone.embed(ids, attn)
            states = clf.backbone.run_blocks(x, inputs, stop=1)
            torch.testing.assert_close(clf.forward_from(states, attn, start=1), full, atol=1e-5, rtol=1e-5)


def test_the_classifier_finishes_only_the_pooled_rows_in_its_last_block(tiny_model):
    assert_one_position_head_matches_the_full_forward(tiny_model)


def test_inference_autocast_gives_autocasts_numbers_from_weight_copies_it_remakes_when_weights_change():
    from llmclf.runtime import autocast, inference_autocast

    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2)).eval()
    ids, cpu, bf16 = torch.randint(0, 97, (3, 10)), torch.device("cpu"), torch.bfloat16
    originals = dict(model.named_parameters())
    query = model.trf_blocks[0].att.W_query

    def plain() -> torch.Tensor:
        with autocast(cpu, bf16):
            return model(ids)

    def with_copies() -> tuple[torch.Tensor, torch.Tensor]:
        with inference_autocast(model, cpu, bf16):
            return model(ids), query.weight

    with torch.no_grad():
        first, copy = with_copies()
        assert copy.dtype == bf16 and torch.equal(first, plain())
        assert with_copies()[1] is copy  # made once
        query.weight.add_(0.5)  # an optimizer step, say
        second, new_copy = with_copies()
        assert new_copy is not copy and torch.equal(second, plain()) and not torch.equal(second, first)
        with pytest.raises(RuntimeError, match="inside"), inference_autocast(model, cpu, bf16):
            raise RuntimeError("inside")
        with inference_autocast(model, cpu, torch.float32):
            assert query.weight is originals["trf_blocks.0.att.W_query.weight"]
    assert all(p is originals[name] and p.dtype == torch.float32 for name, p in model.named_parameters())


@pytest.mark.parametrize("padding", ["right", "left"])
def test_mean_pooling_leaves_out_the_tokens_before_the_text(padding):
    hidden = torch.randn(2, 9, 4, generator=torch.Generator().manual_seed(0))
    lengths = (9, 6)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for row, n in enumerate(lengths):
        first = 0 if padding == "right" else 9 - n
        mask[row, first:first + n] = 1
    pooled = pool(hidden, mask, "mean", skip=2)
    for row, n in enumerate(lengths):
        first = 0 if padding == "right" else 9 - n
        torch.testing.assert_close(pooled[row], hidden[row, first + 2:first + n].mean(0))
    # a text with no tokens after the skipped ones keeps the mean over all its tokens
    torch.testing.assert_close(pool(hidden, mask, "mean", skip=7)[1], pool(hidden, mask, "mean")[1])
    assert torch.equal(pool(hidden, mask, "last", skip=2), pool(hidden, mask, "last"))  # the template's end


def test_template_prefix_tokens_count_the_templates_tokens_before_the_text(tokenizer):
    from llmclf.data.classification import DEFAULT_INSTRUCTION, template_prefix_tokens

    template = DEFAULT_INSTRUCTION.replace("{labels}", "ham, spam") + "\nAnswer:"
    before = template_prefix_tokens(template, tokenizer)
    text = "Free entry in 2 a wkly comp to win FA Cup final tkts"
    ids = tokenizer.encode(template.replace("{text}", text))
    # "\n\n" before a word is two tokens, not the one it is alone: counted on the filled-in template
    assert tokenizer.decode(ids[:before]) == template.split("{text}")[0]
    assert len(tokenizer.encode(template.split("{text}")[0])) == before - 1
    assert tokenizer.decode(ids[before:]) == text + "\nAnswer:"
    assert template_prefix_tokens(None, tokenizer) == 0 and template_prefix_tokens("{text}", tokenizer) == 0


def test_mean_pooling_reads_the_texts_tokens_and_models_saved_before_read_every_token(tmp_path, tiny_lm):
    data = _toy_data(16)
    clf = TextClassifier(str(tiny_lm), epochs=1, precision="float32", template="Review: {text} Sentiment:",
                         ensemble="none", calibration="none").fit(data, data, out_dir=tmp_path / "clf", progress=False)
    assert clf.model_.prefix_tokens == 2  # "Review", ":"
    probs = clf.predict_proba(data.texts)
    config_path = tmp_path / "clf" / "config.json"
    config = json.loads(config_path.read_text())
    assert config["training"]["pool_template"] is False
    np.testing.assert_allclose(load_classifier(tmp_path / "clf", precision="float32").predict_proba(data.texts), probs,
                               atol=1e-6)
    del config["training"]["pool_template"]  # as saved before the option: every token was averaged
    config_path.write_text(json.dumps(config))
    old = load_classifier(tmp_path / "clf", precision="float32")
    assert old.pool_template is True and old.model_.prefix_tokens == 0
    assert not np.allclose(old.predict_proba(data.texts), probs, atol=1e-4)
