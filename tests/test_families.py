"""The family registry, and every classification feature on every registered family (tiny configs)."""

from __future__ import annotations

import json

import pytest
import torch

from llmclf.classifier import TextClassifier, load_classifier, make_classifier
from llmclf.config import GPTConfig, LlamaConfig
from llmclf.data.classification import LabelledTexts
from llmclf.engines import choose_engine
from llmclf.errors import CheckpointError, ConfigError
from llmclf.families import FAMILIES, family_of
from llmclf.loaders.checkpoint import save_checkpoint
from llmclf.loaders.hf_dir import read_hf_dir
from llmclf.loaders.spec import load_model
from llmclf.models.gemma3 import Gemma3Config
from llmclf.models.qwen3 import Qwen3Config
from llmclf.tokenizer import HFTokenizer, load_gpt2_tokenizer

VOCAB = 40
TINY = {  # one tiny config per family; dropout on, so that MC-dropout has something to sample
    "gpt2": GPTConfig(vocab_size=50257, context_length=32, emb_dim=16, n_heads=2, n_layers=3, drop_rate=0.1),
    "llama": LlamaConfig(vocab_size=VOCAB, context_length=32, emb_dim=16, n_heads=4, n_kv_groups=2, n_layers=3,
                         hidden_dim=24, drop_rate=0.1),
    "qwen3": Qwen3Config(vocab_size=VOCAB, context_length=32, emb_dim=16, n_heads=4, n_kv_groups=2, n_layers=3,
                         hidden_dim=24, head_dim=8, drop_rate=0.1),
    "gemma3": Gemma3Config(vocab_size=VOCAB, context_length=32, emb_dim=16, n_heads=4, n_kv_groups=1, n_layers=3,
                           hidden_dim=24, head_dim=8, sliding_window=4, query_pre_attn_scalar=8, drop_rate=0.1,
                           layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
}
WORDS = {"pos": "w5 w6 w7", "neg": "w8 w9 w10"}


def _tokenizer(bos: bool) -> HFTokenizer:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return HFTokenizer(backend, eos_id=1, pad_id=0, source="test", bos_id=2 if bos else None)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_lm(request, tmp_path_factory, gpt2_tokenizer_dir):
    """(family name, directory of a tiny language model of that family saved by llmclf)."""
    name = request.param
    fam = FAMILIES[name]
    torch.manual_seed(0)
    model = fam.build(TINY[name])
    tokenizer = _tokenizer(fam.add_bos) if fam.tokenizer == "hf" else load_gpt2_tokenizer(gpt2_tokenizer_dir)
    return name, save_checkpoint(tmp_path_factory.mktemp(name), model, tokenizer)


def _toy(n: int = 24) -> LabelledTexts:
    labels = ["pos" if i % 2 else "neg" for i in range(n)]
    return LabelledTexts([f"w{4 + i % 20} {WORDS[label]}" for i, label in enumerate(labels)], labels, "toy")


def test_a_saved_model_names_its_family_and_loads_back_equal(family_lm):
    name, directory = family_lm
    config = json.loads((directory / "config.json").read_text())
    assert config["architecture"] == name
    model, tokenizer = load_model(directory)
    assert family_of(model).name == name
    torch.manual_seed(0)
    reference = FAMILIES[name].build(TINY[name]).eval()
    ids = torch.randint(4, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids))
    if FAMILIES[name].tokenizer == "hf":
        assert tokenizer.encode("w5")[0] == (2 if FAMILIES[name].add_bos else 5)  # BOS where the family wants it


def test_chunked_kv_cache_equals_the_full_forward(family_lm):
    """Prefill, then several new tokens at once, then one: each step equals the full recompute."""
    model, _ = load_model(family_lm[1])
    ids = torch.randint(4, VOCAB, (2, 12))
    cache = model.new_kv_cache(16)
    with torch.no_grad():
        full = model(ids)
        steps = [model(ids[:, :5], kv_cache=cache), model(ids[:, 5:11], kv_cache=cache),
                 model(ids[:, 11:], kv_cache=cache)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("trainable,pooling,cache", [
    ("last-block", "last", True), ("last-n:2", "mean", True), ("head", "last-position", True),
    ("lora:4", "last", False), ("all", "mean", False), ("head", "mean-blocks", True)])
def test_every_classification_feature_works_on_every_family(family_lm, tmp_path, trainable, pooling, cache):
    name, directory = family_lm
    data = _toy()
    clf = TextClassifier(str(directory), trainable=trainable, pooling=pooling, cache_frozen=cache, epochs=2,
                         lr=1e-2, batch_size=8, log_every=1000, precision="float32",
                         template="w4 {text} w4", bucket=True, ensemble="none")
    clf.fit(data, data, out_dir=tmp_path / "clf", progress=False)
    probs = clf.predict_proba(data.texts)
    loaded = load_classifier(tmp_path / "clf", precision="float32")  # auto may pick bfloat16 on this CPU
    assert loaded.config_["architecture"] == name and loaded.template_ == "w4 {text} w4"
    torch.testing.assert_close(torch.tensor(loaded.predict_proba(data.texts)), torch.tensor(probs),
                               atol=1e-5, rtol=1e-5)
    mc = loaded.predict_mc_dropout(data.texts[:3], passes=4, seed=0)
    assert mc.mean.shape == (3, 2) and (mc.std > 0).any()  # dropout active: the passes differ


def test_cached_frozen_layers_train_exactly_as_uncached(family_lm):
    _, directory = family_lm
    data = _toy(16)
    runs = [TextClassifier(str(directory), trainable="last-block", cache_frozen=cache, epochs=2, lr=1e-2, batch_size=4,
                           log_every=1000, precision="float32", ensemble="none").fit(data, data, progress=False)
            for cache in (True, False)]
    torch.testing.assert_close(torch.tensor(runs[0].predict_proba(data.texts)),
                               torch.tensor(runs[1].predict_proba(data.texts)), atol=1e-5, rtol=1e-5)


def test_the_server_classifies_with_every_family(family_lm, tmp_path):
    from fastapi.testclient import TestClient

    from llmclf.serve import create_app

    _, directory = family_lm
    data = _toy(16)
    clf = TextClassifier(str(directory), trainable="head", epochs=1, batch_size=8, log_every=1000,
                         precision="float32", ensemble="none").fit(data, data, progress=False)
    with TestClient(create_app(clf)) as client:
        response = client.post("/v1/classify", json={"texts": data.texts[:2]})
    assert response.status_code == 200, response.text
    assert [r["label"] for r in response.json()["results"]] == clf.predict(data.texts[:2])


def test_auto_template_is_the_instruction_in_the_backbones_chat_format(family_lm):
    name, directory = family_lm
    data = _toy(8)
    clf = TextClassifier(str(directory), template="auto", trainable="head", epochs=1, log_every=1000,
                         precision="float32", ensemble="none").fit(data, data, progress=False)
    turn = FAMILIES[name].chat_template
    assert "neg, pos" in clf.template_ and "{text}" in clf.template_
    assert clf.template_.startswith(turn.split("{prompt}")[0] if turn else "Classify")


def test_hugging_face_directories_choose_their_family_and_engine(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    hf = transformers.Qwen3ForCausalLM(config)
    hf.save_pretrained(tmp_path / "qwen3")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    fam, cfg, state = read_hf_dir(tmp_path / "qwen3")
    assert fam.name == "qwen3" and cfg.head_dim == 8
    _, _, sharded = read_hf_dir(tmp_path / "sharded")
    assert sharded.keys() == state.keys() and all(torch.equal(sharded[k], state[k]) for k in state)
    assert choose_engine(tmp_path / "qwen3") == "scratch"
    assert choose_engine("gemma3-270m") == "scratch" and choose_engine("all-minilm-l6-v2") == "hf"
    (tmp_path / "mamba").mkdir()
    (tmp_path / "mamba" / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(CheckpointError, match="model_type 'mamba' is not a registered family; .*gemma3_text.*qwen3"):
        load_model(tmp_path / "mamba")
    llama = {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 16, "num_attention_heads": 4,
             "num_hidden_layers": 1, "intermediate_size": 24, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    (tmp_path / "llama31").mkdir()
    (tmp_path / "llama31" / "config.json").write_text(json.dumps(llama))
    with pytest.raises(CheckpointError, match="rope scaling .*llama3.*not implement .rope_scaling / rope_parameters"):
        load_model(tmp_path / "llama31")
    with pytest.raises(ConfigError, match="decoder for the scratch engine"):
        make_classifier("gemma3-270m", engine="hf").fit(_toy(4), _toy(4), progress=False)


def test_the_course_recipe_is_one_option_away_and_explicit_options_win():
    default = make_classifier("smollm2-135m")  # building it loads nothing
    assert (default.trainable, default.pooling, default.template, default.lr) == ("head", "mean", "auto", 1e-3)
    clf = make_classifier("smollm2-135m", recipe="course", epochs=2)
    assert (clf.trainable, clf.pooling, clf.template, clf.lr, clf.epochs) == ("last-block", "last", None, 5e-5, 2)
    with pytest.raises(ConfigError, match="unknown recipe 'fast'; known: course"):
        make_classifier("smollm2-135m", recipe="fast")
    with pytest.raises(ConfigError, match="recipe 'course' sets --trainable.*the hf engine does not take"):
        make_classifier("all-minilm-l6-v2", recipe="course")


@pytest.mark.parametrize("bos", [False, True])
def test_long_texts_lose_tokens_before_the_templates_end_not_the_end(bos):
    from llmclf.data.classification import encode_texts, template_suffix_tokens

    tokenizer = _tokenizer(bos)
    template = "w4 {text} w30 w31"
    keep = template_suffix_tokens(template, tokenizer)
    assert keep == 2 and template_suffix_tokens("w4 {text}", tokenizer) == 0
    text = template.replace("{text}", " ".join(f"w{i}" for i in range(5, 25)))
    ids = encode_texts([text, "w4 w5 w30 w31"], tokenizer, 8, keep_last=keep)
    start = [2] if bos else []
    full = [*start, 4, *range(5, 25), 30, 31]
    assert ids.ids[0] == full[:6] + [30, 31]  # BOS and the head of the text kept, the assistant turn too
    assert ids.ids[1] == [*start, 4, 5, 30, 31] and ids.truncated == 1


@pytest.mark.parametrize("config,expected", [
    ({}, [2, 5]),  # no add_bos_token: tokenizer.json's post-processor adds BOS (as Llama 3's does)
    ({"add_bos_token": False}, [5]), ({"add_bos_token": True}, [2, 5])])
def test_a_directorys_tokenizer_says_whether_texts_start_with_bos(tmp_path, config, expected):
    from tokenizers import processors

    backend = _tokenizer(False).backend
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>", "bos_token": "<bos>",
                                                                "pad_token": "<pad>", **config}))
    tokenizer = HFTokenizer.from_dir(tmp_path)
    assert tokenizer.encode("w5") == expected and tokenizer.pad_id == 0 and tokenizer.eos_id == 1
