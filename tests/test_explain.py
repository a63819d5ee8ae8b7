"""Explanations (`llmclf.explain`): integrated gradients against Captum, completeness, occlusion through
the ONNX backend and PyTorch alike, and character spans for GPT-2 BPE, SentencePiece-style and WordPiece
tokenizers (a hypothesis property test: inside the text, in order, non-overlapping, the text's own
characters), with the template's tokens never attributed."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmclf.explain import explain, integrated_gradients, model_input_tokens, occlusion
from tiny_classifier import NEGATIVE, POSITIVE, tiny_classifier_dir

TEMPLATE = "Review: {text}\nSentiment:"
TEXTS = [POSITIVE, NEGATIVE, "naïve café 🎉 great", "item 7: awful"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_dir: Path) -> Path:
    return tiny_classifier_dir(tmp_path_factory, shared_dir)


@pytest.fixture(scope="module")
def clf(trained: Path):
    from llmclf.classifier import load_classifier

    return load_classifier(trained, precision="float32")


@pytest.fixture(scope="module")
def templated(clf):
    """The tiny classifier reading its texts inside an instruction template (as the default models do)."""
    other = copy.copy(clf)
    other.template_, other.max_length_ = TEMPLATE, 48
    return other


def _text_positions(model, text: str) -> tuple[list[int], list[bool]]:
    ids, spans, _ = model_input_tokens(model, text)
    return ids, [s is not None for s in spans]


def _forward_with_embeddings(model, ids: list[int]):
    """f(embeddings (n, T, C)) -> logits (n, classes): the classifier with its token embeddings replaced."""
    tok_emb = model.model_.backbone.tok_emb

    def forward(embeddings: torch.Tensor) -> torch.Tensor:
        handle = tok_emb.register_forward_hook(lambda _m, _i, _o: embeddings)
        try:
            rows = torch.tensor([ids] * embeddings.shape[0])
            return model.model_(rows, torch.ones_like(rows))
        finally:
            handle.remove()

    return forward


@pytest.mark.parametrize("steps", [8, 32])
def test_integrated_gradients_equal_captums(templated, steps: int):
    from captum.attr import IntegratedGradients

    text = "today: great wonderful happy"
    ids, in_text = _text_positions(templated, text)
    assert 0 < sum(in_text) < len(ids)  # the template's tokens are there, and are not the text's
    target = 1
    ours, _, _ = integrated_gradients(templated._explain_access(), ids, in_text, target, steps=steps, batch_size=5)
    embeddings = templated.model_.backbone.tok_emb(torch.tensor([ids])).detach()
    average = templated.model_.backbone.tok_emb.weight.detach().mean(0)
    keep = (~torch.tensor(in_text))[None, :, None]
    baseline = torch.where(keep, embeddings, average)  # text tokens the average embedding, template as it is
    theirs = IntegratedGradients(_forward_with_embeddings(templated, ids)).attribute(
        embeddings, baselines=baseline, target=target, n_steps=steps, method="gausslegendre").sum(-1)[0]
    np.testing.assert_allclose(ours, theirs.detach().numpy(), atol=2e-5, rtol=1e-4)
    assert np.all(ours[~np.array(in_text)] == 0)


def test_completeness_and_the_explained_scores(templated):
    """The attributions sum to logit(text) - logit(baseline) within `delta`, which shrinks with more steps;
    the scores are the model's own logits of the predicted label, computed here independently."""
    coarse, fine = explain(templated, TEXTS, steps=2), explain(templated, TEXTS, steps=32)
    assert max(abs(e.delta) for e in fine) < 1e-3
    assert sum(abs(e.delta) for e in fine) < sum(abs(e.delta) for e in coarse)
    for text, e in zip(TEXTS, fine, strict=True):
        assert e.label == templated.predict([text])[0] and e.method == "integrated-gradients"
        target = templated.classes_.index(e.label)
        total = sum(t.attribution for t in e.tokens)
        assert total == pytest.approx(e.score - e.baseline_score, abs=1e-3)
        ids, in_text = _text_positions(templated, text)
        forward = _forward_with_embeddings(templated, ids)
        with torch.no_grad():
            emb = templated.model_.backbone.tok_emb(torch.tensor([ids]))
            full = forward(emb)[0, target].item()
            average = templated.model_.backbone.tok_emb.weight.mean(0)
            at_baseline = forward(torch.where(~torch.tensor(in_text)[None, :, None], emb, average))[0, target].item()
        assert (e.score, e.baseline_score) == pytest.approx((full, at_baseline), abs=1e-4)
        assert "".join(t.text for t in e.tokens) == text  # GPT-2 BPE covers every character
        assert all(text[t.start:t.end] == t.text for t in e.tokens)


def test_the_positive_words_carry_the_positive_label(clf):
    e = clf.explain([POSITIVE], steps=32)[0]
    assert e.label == "pos"
    by_word = {t.text.strip(): t.attribution for t in e.tokens}
    assert max(by_word, key=by_word.get) in {"great", "wonderful", "happy"}


def test_occlusion_is_the_drop_in_probability(clf):
    torch_occ = explain(clf, TEXTS[:2], method="occlusion")
    for text, e in zip(TEXTS[:2], torch_occ, strict=True):
        target = clf.classes_.index(e.label)
        ids, in_text = _text_positions(clf, text)
        with torch.no_grad():
            p = lambda seq, t=target: torch.softmax(clf.model_(torch.tensor([seq]), torch.ones(1, len(seq))), -1)[0, t]  # noqa: E731
            first = in_text.index(True)
            assert e.score == pytest.approx(p(ids).item(), abs=1e-5)
            assert e.tokens[0].attribution == pytest.approx((p(ids) - p(ids[:first] + ids[first + 1:])).item(),
                                                            abs=1e-5)
        assert e.delta is None and e.steps is None


@pytest.mark.slow  # the ONNX export takes ~10-20 s of this 2-core machine
def test_onnx_explains_by_occlusion_as_pytorch_does(clf, tmp_path):
    from llmclf.classifier import load_classifier
    from llmclf.export.onnx import export_onnx

    torch_occ = explain(clf, TEXTS[:2], method="occlusion")
    export_onnx(clf, tmp_path / "onnx")
    onnx_clf = load_classifier(tmp_path / "onnx", precision="float32")
    onnx_occ = onnx_clf.explain(TEXTS[:2])  # auto: no gradients through ONNX Runtime, so occlusion
    for a, b in zip(torch_occ, onnx_occ, strict=True):
        assert b.method == "occlusion" and [t.text for t in a.tokens] == [t.text for t in b.tokens]
        np.testing.assert_allclose([t.attribution for t in a.tokens], [t.attribution for t in b.tokens], atol=1e-4)
    with pytest.raises(Exception, match="integrated gradients need the PyTorch model"):
        onnx_clf.explain(TEXTS[:1], method="integrated-gradients")


def test_occlusion_function_removes_only_text_tokens(clf):
    access = clf._explain_access()
    ids, in_text = _text_positions(clf, POSITIVE)
    attributions, score, without_text = occlusion(access, ids, in_text, 1)
    assert len(attributions) == len(ids) and 0 <= without_text <= 1 and 0 <= score <= 1


def test_a_long_text_is_cut_and_says_so(clf):
    e = clf.explain(["great " * 200], steps=4)[0]
    assert e.truncated and len(e.tokens) <= clf.max_length_
    assert not clf.explain(["great"], steps=4)[0].truncated


def test_an_empty_text_has_nothing_to_attribute(clf):
    for method in ("integrated-gradients", "occlusion"):
        e = clf.explain([""], method=method, steps=4)[0]
        assert e.tokens == [] and e.label == clf.predict([""])[0]


def test_the_picture_is_written(clf, tmp_path):
    from PIL import Image

    from llmclf.explain import plot_explanation

    text = "Win $1000 cash\nnow: great wonderful happy " * 3
    path = plot_explanation(text, clf.explain([text], steps=4)[0], tmp_path / "e.png", probability=0.9)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 400 and image.size[1] > 100


def test_bad_options_are_refused(clf):
    with pytest.raises(Exception, match="steps must be in"):
        clf.explain(["x"], steps=0)
    with pytest.raises(Exception, match="unknown explanation method"):
        clf.explain(["x"], method="shap")


# --- character spans for three kinds of tokenizer -------------------------------------------------


def _sentencepiece_style():
    """A SentencePiece-style BPE (`▁` for spaces, byte fallback, a BOS token) trained on a few words."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    from llmclf.tokenizer import HFTokenizer

    backend = Tokenizer(models.BPE(byte_fallback=True, unk_token=None))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Metaspace()
    specials = ["<pad>", "<bos>", "<eos>"] + [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    backend.train_from_iterator(["today great wonderful happy awful terrible sad naïve café"] * 20, trainer)
    return HFTokenizer(backend, eos_id=2, pad_id=0, source="tiny-sp", bos_id=1)


def _wordpiece():
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "great", "wonder", "##ful", "happy", "a", "##b", "."]
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})


@pytest.fixture(scope="module")
def tokenizers(tokenizer):
    return {"gpt2-bpe": tokenizer, "sentencepiece": _sentencepiece_style(), "wordpiece": _wordpiece()}


@pytest.mark.parametrize("kind", ["gpt2-bpe", "sentencepiece", "wordpiece"])
@pytest.mark.parametrize("template", [None, "Classify: {text}\nAnswer:"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)
       | st.sampled_from(["naïve café 🎉 great", "wonderful happy.", "  a  b ", "\n\t", "ab" * 30]))
def test_spans_lie_in_the_text_in_order_without_overlap(tokenizers, kind, template, text):
    from llmclf.explain import _pieces

    model = SimpleNamespace(tokenizer_=tokenizers[kind], template_=template, max_length_=32)
    ids, spans, truncated = model_input_tokens(model, text)
    assert len(ids) == len(spans) and len(ids) <= 32
    pieces = _pieces(spans)
    end = 0
    for start, stop, positions in pieces:
        assert end <= start <= stop <= len(text) and positions
        end = stop
    covered = sum(stop - start for start, stop, _ in pieces)
    if kind == "gpt2-bpe" and not truncated:  # byte-level BPE: every character is in some token
        assert covered == len(text)
    if template is not None:  # the template's own tokens are never the text's
        head = model_input_tokens(model, "")[0]
        assert all(s is None for s in model_input_tokens(model, "")[1])
        assert ids[:2] == head[:2] or not text  # the instruction's first tokens are there, unattributed
        assert spans[0] is None


# --- the CLI and the server -----------------------------------------------------------------------


def test_predict_explain_prints_and_writes_json(trained: Path, clf):
    import json

    from typer.testing import CliRunner

    from llmclf.cli import app

    runner = CliRunner()
    args = ["predict", "--model", str(trained), "--precision", "float32", "--explain", "--explain-steps", "8"]
    result = runner.invoke(app, [*args, "--json", POSITIVE])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output.strip().splitlines()[-1])
    expected = clf.explain([POSITIVE], steps=8)[0]
    got = record["explanation"]["tokens"]
    assert [t["text"] for t in got] == [t.text for t in expected.tokens]
    assert [t["attribution"] for t in got] == pytest.approx([t.attribution for t in expected.tokens], abs=1e-5)
    assert record["label"] == record["explanation"]["label"] == expected.label
    table = runner.invoke(app, [*args, POSITIVE])
    assert table.exit_code == 0 and "explains: the language model's logit of 'pos'" in table.output
    assert "happy(" in table.output
    refused = runner.invoke(app, [*args, "--mc-dropout", "2", POSITIVE])
    assert refused.exit_code != 0 and "one deterministic pass" in refused.output


def test_the_api_explains_within_its_limits(clf):
    import asyncio

    import httpx

    from llmclf.serve import create_app, defaults

    async def go(body):
        transport = httpx.ASGITransport(app=create_app(clf))
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
            return await c.post("/v1/classify", json=body)

    r = asyncio.run(go({"texts": [POSITIVE, NEGATIVE], "explain": True}))
    assert r.status_code == 200, r.text
    for result, e in zip(r.json()["results"], clf.explain([POSITIVE, NEGATIVE], steps=defaults.EXPLAIN_STEPS),
                         strict=True):
        got = result["explanation"]
        assert result["label"] == got["label"] == e.label
        assert [(t["start"], t["end"], t["text"]) for t in got["tokens"]] == [(t.start, t.end, t.text)
                                                                               for t in e.tokens]
        assert [t["attribution"] for t in got["tokens"]] == pytest.approx([t.attribution for t in e.tokens],
                                                                           abs=1e-5)
    plain = asyncio.run(go({"texts": [POSITIVE]})).json()["results"][0]
    assert "explanation" not in plain
    too_many = asyncio.run(go({"texts": ["x"] * (defaults.MAX_EXPLAIN_TEXTS + 1), "explain": True}))
    assert too_many.status_code == 413 and "limit with explanations" in too_many.json()["detail"]
    both = asyncio.run(go({"texts": ["x"], "explain": True, "mc_dropout": 2}))
    assert both.status_code == 422
    assert asyncio.run(go({"texts": ["x"], "explain": "yes"})).status_code == 422


def test_the_transformers_engine_explains_through_its_input_embeddings():
    """A tiny random BERT (WordPiece) in the Transformers engine: integrated gradients through
    `get_input_embeddings()`, complete, over the text's own words only (not [CLS]/[SEP])."""
    from transformers import BertConfig, BertForSequenceClassification

    from llmclf.engines.hf import HFClassifier

    torch.manual_seed(0)
    config = BertConfig(vocab_size=12, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=2)
    clf = HFClassifier("tiny-bert", precision="float32")
    clf.model_, clf.tokenizer_ = BertForSequenceClassification(config).eval(), _wordpiece()
    clf.classes_, clf.max_length_, clf.template_, clf.ngrams_ = ["neg", "pos"], 32, None, None
    text = "Great wonderful, happy."
    e = clf.explain([text], steps=64)[0]
    assert [t.text for t in e.tokens] == ["Great", "wonder", "ful", ",", "happy", "."]  # "," is [UNK]
    assert [(t.start, t.end) for t in e.tokens[1:3]] == [(6, 12), (12, 15)]
    assert abs(e.delta) < 1e-3 * max(1.0, abs(e.score - e.baseline_score))
    assert e.label == clf.predict([text])[0]
