"""The sentence-encoder member of the blend (`--ensemble tfidf+ENCODER`, llmclf.sentence_encoder)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llmclf.classifier import load_classifier
from llmclf.engines.scratch import TextClassifier
from llmclf.errors import ConfigError
from llmclf.ngrams import NGRAMS_FILE, fit_blend_weights
from llmclf.sentence_encoder import ENCODER_FILE, sentence_embeddings
from llmclf.training.args import TrainArgs
from test_ngrams import _topics


def test_embeddings_are_the_normalised_mean_of_each_texts_own_tokens(tiny_encoder_dir: Path):
    from transformers import AutoModel, AutoTokenizer

    texts = ["bank", "the match goal team score today", "new chip and code", "profit"]
    embedded = sentence_embeddings(str(tiny_encoder_dir), texts)  # batched with padding
    tokenizer, model = AutoTokenizer.from_pretrained(tiny_encoder_dir), AutoModel.from_pretrained(tiny_encoder_dir)
    model.eval()
    for text, got in zip(texts, embedded, strict=True):
        with torch.no_grad():  # one text alone: no padding to leave out
            states = model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0]
        mean = states.mean(0)
        np.testing.assert_allclose(got, (mean / mean.norm()).numpy(), atol=1e-5)
    assert np.allclose(np.linalg.norm(embedded, axis=1), 1.0, atol=1e-5)


def test_the_weights_find_the_member_that_knows():
    rng = np.random.default_rng(0)
    y = np.arange(90) % 3
    noise = [np.log(rng.dirichlet(np.ones(3), size=90)) for _ in range(2)]
    knows = np.log(np.eye(3)[y] * 0.9 + 0.1 / 3)
    weights = fit_blend_weights([*noise, knows], y, prior=0.0)
    assert weights.shape == (3,) and weights[2] > 1.0 and weights[:2].max() < 0.2
    pulled = fit_blend_weights([*noise, knows], y)  # the default pull toward equal shares
    assert 1 / 3 < pulled[2] / pulled.sum() < weights[2] / weights.sum()


def test_an_encoder_blend_trains_saves_reloads_and_refuses_bad_files(tmp_path: Path, tiny_checkpoint: Path,
                                                                     tiny_encoder_dir: Path):
    train, val = _topics(48, 1), _topics(24, 2)
    ensemble = f"tfidf+{tiny_encoder_dir}"
    clf = TextClassifier(str(tiny_checkpoint), ensemble=ensemble, epochs=1, template=None, precision="float32")
    out = tmp_path / "clf"
    clf.fit(train, val, out_dir=out, progress=False)
    assert (out / NGRAMS_FILE).is_file() and (out / ENCODER_FILE).is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["training"]["ensemble"] == ensemble
    report = config["metrics"]["ensemble"]
    assert report["members"] == ["language_model", "ngrams", "encoder"] and len(report["weights"]) == 3
    assert "out-of-fold" in report["fitted_on"] and set(report["validation_accuracy"]) == {
        "language_model", "ngrams", "encoder", "blend"}
    assert clf.val_metrics_["loss"] == pytest.approx(clf.evaluate(val)["loss"], rel=1e-5)

    new = _topics(12, 3).texts
    probs = clf.predict_proba(new)
    reloaded = load_classifier(out, precision="float32")
    np.testing.assert_allclose(reloaded.predict_proba(new), probs, atol=1e-6)
    # the blend, by hand: the language model's, the n-grams' and the encoder's log-probabilities, weighted
    lm = reloaded._probabilities(new, 8, dropout=False)
    encoder_scores = reloaded.encoder_.scores_of(sentence_embeddings(str(tiny_encoder_dir), new))
    by_hand = reloaded.ngrams_.combine(lm, reloaded.ngrams_.scores(new), encoder_scores)
    np.testing.assert_allclose(probs, reloaded._calibrated(by_hand), atol=1e-6)
    assert reloaded.ngrams_.weights.shape == (3,)

    config["training"]["ensemble"] = "tfidf+all-minilm-l6-v2"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="fitted on the encoder .*tiny-encoder.* but config.json names 'all-minilm"):
        load_classifier(out)
    config["training"]["ensemble"] = ensemble
    (out / "config.json").write_text(json.dumps(config))
    (out / ENCODER_FILE).unlink()
    with pytest.raises(ConfigError, match=r"encoder.safetensors is missing"):
        load_classifier(out)


def test_the_option_names_its_forms():
    with pytest.raises(ConfigError, match=r"--ensemble must be none, tfidf or tfidf\+ENCODER .*got 'minilm'"):
        TrainArgs(ensemble="minilm")
    assert TrainArgs(ensemble="tfidf+all-minilm-l6-v2").ensemble == "tfidf+all-minilm-l6-v2"


def test_a_missing_encoder_is_named_before_training(tmp_path: Path, tiny_checkpoint: Path, monkeypatch):
    from llmclf.loaders import encoders
    from llmclf.loaders.packaged import PackagedModel

    missing = PackagedModel("llmclf-no-such-dist", "1.0", "x")
    monkeypatch.setitem(encoders.PACKAGED_HF_MODELS, "no-such-encoder", missing)
    clf = TextClassifier(str(tiny_checkpoint), ensemble="tfidf+no-such-encoder", epochs=1, template=None)
    with pytest.raises(ConfigError, match="llmclf-no-such-dist"):
        clf.fit(_topics(24, 1), _topics(12, 2), out_dir=tmp_path / "clf", progress=False)
    assert not (tmp_path / "clf").exists()  # nothing trained, nothing written
