"""Zero- and few-shot classification (`llmclf.zero_shot`) with tiny random causal LMs: the shared-prefix
KV cache against plain full-sequence scoring, the classifier API, its errors, the CLI and the server."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from llmclf.cli import app
from llmclf.config import GPTConfig
from llmclf.data.classification import LabelledTexts
from llmclf.errors import ConfigError, DataError
from llmclf.models.gemma3 import Gemma3Config, Gemma3Model
from llmclf.models.gpt2 import GPTModel
from llmclf.models.llama import LlamaConfig, LlamaModel
from llmclf.zero_shot import ZeroShotClassifier, label_log_probs

VOCAB = 50
MODELS = {
    "gpt2": lambda: GPTModel(GPTConfig(vocab_size=VOCAB, context_length=64, emb_dim=16, n_heads=2, n_layers=2,
                                       drop_rate=0.0)),
    "llama": lambda: LlamaModel(LlamaConfig(vocab_size=VOCAB, context_length=64, emb_dim=16, n_heads=4,
                                            n_kv_groups=2, n_layers=2, hidden_dim=24, drop_rate=0.0)),
    "gemma3": lambda: Gemma3Model(Gemma3Config(
        vocab_size=VOCAB, context_length=64, emb_dim=16, n_heads=4, n_kv_groups=1, n_layers=2, hidden_dim=24,
        head_dim=8, sliding_window=4, query_pre_attn_scalar=8, drop_rate=0.0,
        layer_types=["sliding_attention", "full_attention"])),
}


def full_sequence_log_probs(model, prefix, text, label) -> list[float]:
    """The reference: one plain forward pass (no cache, no padding) over prefix + text + label."""
    ids = torch.tensor([prefix + text + label])
    with torch.no_grad():
        logp = F.log_softmax(model(ids)[0].float(), dim=-1)
    start = len(prefix) + len(text)
    return [float(logp[start + k - 1, tok]) for k, tok in enumerate(label)]


@pytest.mark.parametrize("family", sorted(MODELS))
def test_cached_prefix_scoring_equals_full_sequence_scoring(family):
    torch.manual_seed(0)
    model = MODELS[family]().eval()
    prefix = [3, 14, 15, 9, 26, 5, 35, 8]
    texts = [[7, 1], [2, 4, 6, 8, 10, 12], [11]]  # different lengths: padded in one batch
    labels = [[20], [21, 22, 23], [24, 25]]  # different lengths too
    cache = model.new_kv_cache(len(prefix))
    with torch.no_grad():
        model.hidden_states(torch.tensor([prefix]), kv_cache=cache)
    got = label_log_probs(model, cache, texts, labels, pad_id=0)
    assert got.shape == (3, 3, 3)
    for i, text in enumerate(texts):
        for j, label in enumerate(labels):
            want = full_sequence_log_probs(model, prefix, text, label)
            torch.testing.assert_close(got[i, j, : len(label)], torch.tensor(want), atol=1e-5, rtol=1e-4)
            assert bool((got[i, j, len(label):] == 0).all())


# --- the classifier, on a tiny GPT-2 with the real GPT-2 tokenizer -----------------------------------

@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory, gpt2_tokenizer_dir):
    from llmclf.loaders.checkpoint import save_checkpoint
    from llmclf.tokenizer import load_gpt2_tokenizer

    torch.manual_seed(1)
    model = GPTModel(GPTConfig(vocab_size=50257, context_length=256, emb_dim=32, n_heads=4, n_layers=2,
                               drop_rate=0.0))
    return str(save_checkpoint(tmp_path_factory.mktemp("zs") / "lm", model, load_gpt2_tokenizer(gpt2_tokenizer_dir)))


EXAMPLES = LabelledTexts(["great fun", "loved it", "so good", "awful mess", "hated it", "so bad"],
                         ["positive", "positive", "positive", "negative", "negative", "negative"], "examples")
TEXTS = ["What a wonderful film.", "Dull.", "", "It was okay, I guess, with some good parts and bad parts."]


_LOADED: dict[str, ZeroShotClassifier] = {}


def zs(tiny_lm, **kw) -> ZeroShotClassifier:
    """An unfitted classifier of `tiny_lm`; the model is read from disk once per session (fit keeps it)."""
    clf = ZeroShotClassifier(tiny_lm, **{"labels": ["positive", "negative"], "precision": "float32", **kw})
    if tiny_lm not in _LOADED:
        _LOADED[tiny_lm] = ZeroShotClassifier(tiny_lm, labels=["a", "b"], precision="float32").fit()
    loaded = _LOADED[tiny_lm]
    for name in ("model_", "tokenizer_", "device_", "dtype_", "chat_template_", "loaded_spec_"):
        setattr(clf, name, getattr(loaded, name))
    return clf


def test_probabilities_sum_to_one_and_follow_the_label_order(tiny_lm):
    clf = zs(tiny_lm).fit()
    probs = clf.predict_proba(TEXTS)
    assert probs.shape == (4, 2) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert clf.classes_ == ["positive", "negative"]
    assert clf.predict(TEXTS) == [clf.classes_[i] for i in probs.argmax(1)]
    # the template names the labels in the given order, so swap it back to compare the columns alone
    swapped = zs(tiny_lm, labels=["negative", "positive"], template="one of: positive, negative\n{text}").fit()
    same = zs(tiny_lm, template="one of: positive, negative\n{text}").fit()
    np.testing.assert_allclose(swapped.predict_proba(TEXTS)[:, ::-1], same.predict_proba(TEXTS), atol=1e-6)
    one_by_one = np.vstack([clf.predict_proba([t]) for t in TEXTS])  # padding in a batch changes nothing
    np.testing.assert_allclose(one_by_one, probs, atol=1e-5)


def test_classifier_probabilities_equal_full_sequence_scoring(tiny_lm):
    labels = ["positive", "very negative"]  # one and two tokens
    examples = LabelledTexts(EXAMPLES.texts, [x.replace("negative", "very negative") for x in EXAMPLES.labels], "ex")
    for score in ("mean", "sum"):
        clf = zs(tiny_lm, labels=labels, score=score, shots=1).fit(examples)
        model, seqs = clf.model_, clf._text_ids(TEXTS[:2])
        for text, row in zip(seqs, clf.predict_proba(TEXTS[:2]), strict=True):
            scores = []
            for label in clf.label_ids_:
                logp = full_sequence_log_probs(model, clf.prefix_ids_, text, label)
                scores.append(sum(logp) / (len(logp) if score == "mean" else 1))
            np.testing.assert_allclose(row, torch.softmax(torch.tensor(scores), 0).numpy(), atol=1e-5)


def test_few_shot_puts_k_examples_per_class_in_the_shared_prompt(tiny_lm):
    clf = zs(tiny_lm, shots=2, seed=5).fit(EXAMPLES)
    prompt = clf.tokenizer_.decode(clf.prefix_ids_)
    # each example is an earlier turn: the text as the template writes it, then its label as the answer
    assert [t for t in EXAMPLES.texts if f"Text: {t}\n{EXAMPLES.labels[EXAMPLES.texts.index(t)]}\n" in prompt] \
        and sum(prompt.count(f"\n{lab}\n") for lab in ("positive", "negative")) == 4
    assert clf.info()["zero_shot"]["shots"] == 2 and clf.info()["engine"] == "zero-shot"
    again = zs(tiny_lm, shots=2, seed=5).fit(EXAMPLES)
    assert again.prefix_ids_ == clf.prefix_ids_  # the seed fixes the draw
    nearest = zs(tiny_lm, shots=1, shot_selection="nearest").fit(EXAMPLES)
    probs = nearest.predict_proba(TEXTS)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    own = nearest.tokenizer_.decode(nearest._text_ids(["great fun"])[0])
    assert own.count("Text: ") == 3 and own.startswith("\n\nText: ") and "Text: great fun\npositive\n" in own


@pytest.mark.parametrize(("template", "want"), [
    ("<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
     "<|im_start|>user\nQ: a<|im_end|>\n<|im_start|>assistant\nx<|im_end|>\n<|im_start|>user\nQ: b<|im_end|>\n"
     "<|im_start|>assistant\n"),
    ("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
     "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nQ: a<|im_end|>\n<|im_start|>assistant\nx<|im_end|>\n"
     "<|im_start|>user\nQ: b<|im_end|>\n<|im_start|>assistant\n"),
    ("<start_of_turn>user\n{prompt}<end_of_turn>\n<start_of_turn>model\n",
     "<start_of_turn>user\nQ: a<end_of_turn>\n<start_of_turn>model\nx<end_of_turn>\n<start_of_turn>user\nQ: b"
     "<end_of_turn>\n<start_of_turn>model\n"),
    (None, "Q: a\nx\nQ: b\n"),
])
def test_examples_are_earlier_turns_of_the_chat_format(template, want):
    """An example turn then the question, in the families' chat formats (and plain text without one)."""
    from llmclf.zero_shot import conversation_parts

    first, answer, end, next_turn = conversation_parts(template)
    assert first + "Q: a" + answer + "x" + end + next_turn + "Q: b" + answer == want


def test_content_free_calibration_divides_out_the_prompt_bias(tiny_lm, monkeypatch):
    """Calibrated on one content-free text, that text comes out uniform; others are the plain
    probabilities divided by its probabilities, renormalised."""
    import llmclf.zero_shot as zero_shot

    monkeypatch.setattr(zero_shot, "CONTENT_FREE_TEXTS", ("N/A",))
    plain = zs(tiny_lm, shots=1).fit(EXAMPLES)
    calibrated = zs(tiny_lm, shots=1, calibrate="content-free").fit(EXAMPLES)
    np.testing.assert_allclose(calibrated.predict_proba(["N/A"]), [[0.5, 0.5]], atol=1e-6)
    bias = plain.predict_proba(["N/A"])[0]
    want = plain.predict_proba(TEXTS) / bias
    np.testing.assert_allclose(calibrated.predict_proba(TEXTS), want / want.sum(1, keepdims=True), atol=1e-6)
    info = calibrated.info()["zero_shot"]
    assert info["calibrate"] == "content-free"
    np.testing.assert_allclose(list(info["content_free_probabilities"].values()), bias, atol=1e-6)


def test_name_equals_words_scores_the_words_under_the_name(tiny_lm):
    """`ham=not spam`: the class (and the data's label) is "ham"; the model reads and scores "not spam",
    in the prompt's label list, as the answer and in the few-shot examples."""
    examples = LabelledTexts(EXAMPLES.texts, [x.replace("negative", "ham") for x in EXAMPLES.labels], "ex")
    named = zs(tiny_lm, labels=["positive", "ham=very negative"], shots=1).fit(examples)
    plain = zs(tiny_lm, labels=["positive", "very negative"], shots=1).fit(
        LabelledTexts(EXAMPLES.texts, [x.replace("negative", "very negative") for x in EXAMPLES.labels], "ex"))
    assert named.classes_ == ["positive", "ham"] and named.label_ids_ == plain.label_ids_
    assert named.prefix_ids_ == plain.prefix_ids_  # the same prompt, examples included
    np.testing.assert_allclose(named.predict_proba(TEXTS), plain.predict_proba(TEXTS), atol=1e-6)
    assert set(named.predict(TEXTS)) <= {"positive", "ham"}
    assert named.evaluate(LabelledTexts(["good", "bad"], ["positive", "ham"], "t"))["n"] == 2


def test_long_texts_are_cut_to_the_context(tiny_lm):
    clf = zs(tiny_lm).fit()
    probs = clf.predict_proba(["word " * 1000])
    assert np.allclose(probs.sum(), 1.0, atol=1e-5)


@pytest.mark.parametrize("kw, examples, message", [
    ({"labels": []}, None, "label set is empty"),
    ({"labels": ["positive", "positive"]}, None, "duplicate label"),
    ({"labels": ["positive", ""]}, None, "tokenise to nothing"),
    ({"labels": ["positive", "ham="]}, None, "NAME=WORDS needs both"),
    ({"labels": ["a=good", "b=good"]}, None, "duplicate label wording"),
    ({"labels": ["positive"]}, None, "two or more"),
    ({"max_length": 12}, None, "more than the context"),
    ({"shots": 2}, None, "needs labelled examples"),
    ({"shots": 4}, EXAMPLES, "fewer than --shots 4"),
    ({"shots": 100, "labels": ["positive", "negative"]}, LabelledTexts(["x"] * 200, ["positive", "negative"] * 100,
                                                                        "big"), "do not fit the context"),
    ({"shots": 1, "labels": ["good", "bad"]}, EXAMPLES, "not among the zero-shot labels"),
    ({"score": "max"}, None, "score must be"),
    ({"calibrate": "yes"}, None, "calibrate must be"),
    ({"template": "no place for the text"}, None, "{text}"),
])
def test_bad_input_gets_a_clear_error(tiny_lm, kw, examples, message):
    with pytest.raises((ConfigError, DataError), match=message.replace("{", r"\{").replace("}", r"\}")):
        zs(tiny_lm, **kw).fit(examples)


def test_encoders_are_refused_naming_the_models_that_can():
    with pytest.raises(ConfigError, match="smollm2-135m.*qwen2.5-0.5b"):
        ZeroShotClassifier("all-minilm-l6-v2", labels=["a", "b"]).fit()


def test_evaluate_and_mc_dropout(tiny_lm):
    clf = zs(tiny_lm).fit()
    metrics = clf.evaluate(LabelledTexts(["good", "bad", "fine"], ["positive", "negative", "positive"], "t"))
    assert metrics["n"] == 3 and 0.0 <= metrics["accuracy"] <= 1.0
    with pytest.raises(DataError, match="not among"):
        clf.evaluate(LabelledTexts(["x"], ["neutral"], "t"))
    with pytest.raises(ConfigError, match="zero-shot classifier scores label words"):
        clf.explain(["good"])
    with pytest.raises(ConfigError, match="deterministic"):
        clf.predict_mc_dropout(["x"])


# --- CLI and server -------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_predict_and_evaluate_zero_shot(tiny_lm, tmp_path):
    result = runner.invoke(app, ["predict", "--zero-shot", "--model", tiny_lm, "--labels", "positive, negative",
                                 "--precision", "float32", "--json", "Great!", "Awful."])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.output.strip().splitlines()]
    want = zs(tiny_lm).fit().predict_proba(["Great!", "Awful."])
    assert [list(r["probabilities"]) for r in records] == [["positive", "negative"]] * 2
    np.testing.assert_allclose([list(r["probabilities"].values()) for r in records], want, atol=1e-5)
    data = tmp_path / "test.csv"
    data.write_text("text,label\ngood fun,positive\nawful,negative\nso bad,negative\n", encoding="utf-8")
    train = tmp_path / "train.csv"
    train.write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in zip(EXAMPLES.texts, EXAMPLES.labels,
                                                                                strict=True)), encoding="utf-8")
    result = runner.invoke(app, ["evaluate", "--zero-shot", "--model", tiny_lm, "--labels", "positive,negative",
                                 "--shots", "1", "--train", str(train), "--data", str(data), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["n"] == 3
    bad = runner.invoke(app, ["predict", "--zero-shot", "--model", tiny_lm, "--labels", "a,a", "x"])
    assert isinstance(bad.exception, ConfigError) and "duplicate label" in str(bad.exception)
    no_flag = runner.invoke(app, ["predict", "--model", tiny_lm, "--labels", "a,b", "x"])
    assert no_flag.exit_code != 0 and "--zero-shot" in no_flag.output
    no_train = runner.invoke(app, ["evaluate", "--zero-shot", "--model", tiny_lm, "--labels", "a,b", "--shots", "2",
                                   "--data", str(data)])
    assert no_train.exit_code != 0 and "--train" in no_train.output


def test_serve_zero_shot(tiny_lm, monkeypatch):
    import llmclf.serve.server as server

    started = {}
    monkeypatch.setattr(server, "run_server", lambda config: started.setdefault("config", config))
    result = runner.invoke(app, ["serve", "--zero-shot", "--model", tiny_lm, "--labels", "positive,negative",
                                 "--precision", "float32"])
    assert result.exit_code == 0, result.output

    async def go():
        transport = httpx.ASGITransport(app=started["config"].app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as c:
            return await c.post("/v1/classify", json={"texts": ["Great!"]}), await c.get("/v1/model"), \
                await c.post("/v1/classify", json={"texts": ["Great!"], "mc_dropout": 2})

    classify, model, mc = asyncio.run(go())
    assert classify.status_code == 200, classify.text
    want = zs(tiny_lm).fit().predict_proba(["Great!"])[0]
    np.testing.assert_allclose(list(classify.json()["results"][0]["probabilities"].values()), want, atol=1e-5)
    assert model.json()["engine"] == "zero-shot" and model.json()["labels"] == ["positive", "negative"]
    assert mc.status_code == 422 and "zero-shot" in mc.text


@pytest.mark.slow
def test_smollm2_zero_shot_tells_sentiment_apart():
    clf = ZeroShotClassifier("smollm2-135m", labels=["positive", "negative"]).fit()
    assert clf.predict(["I loved this movie, wonderful acting.", "Terrible, boring and way too long."]) == \
        ["positive", "negative"]
    few = ZeroShotClassifier("smollm2-135m", labels=["positive", "negative"], shots=2).fit(EXAMPLES)
    assert np.allclose(few.predict_proba(["Loved it."]).sum(), 1.0, atol=1e-5)
