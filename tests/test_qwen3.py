"""The Qwen3 (and Qwen2) model against Hugging Face and the book's Qwen3Model; config and name maps."""

from __future__ import annotations

import json
import re

import pytest
import torch

from llmclf.errors import CheckpointError, ConfigError
from llmclf.families import rename_state
from llmclf.models.heads import SequenceClassifier, replace_head
from llmclf.models.qwen3 import (
    GGUF_NAMES,
    HF_NAMES,
    Qwen3Config,
    Qwen3Model,
    config_from_gguf,
    config_from_hf,
    gguf_names,
    hf_names,
)

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

VOCAB = 128
# head_dim 16 while hidden_size / heads is 8: Qwen3's explicit head size is really used.
SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)


def _tiny_hf(kind: str = "qwen3", tie: bool = True):
    torch.manual_seed(0)
    if kind == "qwen3":
        config = transformers.Qwen3Config(**SIZES, head_dim=16, rope_theta=10000.0, tie_word_embeddings=tie)
        model = transformers.Qwen3ForCausalLM(config)
    else:
        config = transformers.Qwen2Config(**SIZES, rope_theta=10000.0, tie_word_embeddings=tie)
        model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():  # random norm weights and biases, so a misplaced one shows
        for param_name, param in model.named_parameters():
            if "norm" in param_name or param_name.endswith("bias"):
                param.uniform_(0.5, 1.5)
    return model.eval()


def _load(hf, tmp_path) -> Qwen3Model:
    """What the HF loader does: config.json -> config; safetensors -> our names -> state dict."""
    hf.save_pretrained(tmp_path)
    cfg = config_from_hf(json.loads((tmp_path / "config.json").read_text()), "tiny")
    tensors = safetensors_torch.load_file(tmp_path / "model.safetensors")
    model = Qwen3Model(cfg).eval()
    model.load_state_dict(rename_state(tensors, hf_names(cfg), cfg, str(tmp_path)))
    return model


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("tie", [True, False])
def test_same_logits_as_transformers_qwen3(tmp_path, tie):
    hf = _tiny_hf(tie=tie)
    model = _load(hf, tmp_path)
    assert model.cfg.head_dim == 16 and model.cfg.qk_norm and not model.cfg.qkv_bias
    assert (model.out_head.weight is model.tok_emb.weight) == tie
    x = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        assert _max_diff(model(x), hf(x).logits) < 1e-4


def test_padding_side_does_not_matter(tmp_path):
    hf = _tiny_hf()
    model = _load(hf, tmp_path)
    seqs = [torch.randint(0, VOCAB, (n,)) for n in (9, 5)]
    width, pad = 9, 0
    right = torch.stack([torch.cat([s, torch.full((width - len(s),), pad)]) for s in seqs])
    left = torch.stack([torch.cat([torch.full((width - len(s),), pad), s]) for s in seqs])
    right_mask = torch.arange(width) < torch.tensor([9, 5])[:, None]
    left_mask = torch.flip(right_mask, [1])
    with torch.no_grad():
        right_logits, left_logits = model(right, right_mask.long()), model(left, left_mask.long())
        for i, s in enumerate(seqs):
            expected = hf(s[None]).logits[0]
            assert _max_diff(right_logits[i, right_mask[i]], expected) < 1e-4
            assert _max_diff(left_logits[i, left_mask[i]], expected) < 1e-4
        # Classification reads one row of the last block (`only_at`): the same as the full model there.
        hidden = model.hidden_states(left, left_mask.long())[:, -1]
        classifier = SequenceClassifier(replace_head(model, 3), "last").eval()
        assert _max_diff(classifier(left, left_mask.long()), model.out_head(hidden)) < 1e-5


def test_qwen2_with_biases_matches_transformers(tmp_path):
    hf = _tiny_hf("qwen2", tie=False)
    model = _load(hf, tmp_path)
    assert model.cfg.qkv_bias and not model.cfg.qk_norm and model.cfg.head_dim == 8
    assert model.trf_blocks[0].att.q_norm is None
    x = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        assert _max_diff(model(x), hf(x).logits) < 1e-4


def test_same_logits_as_the_book():
    book = pytest.importorskip("llms_from_scratch.qwen3")
    cfg = Qwen3Config(vocab_size=VOCAB, context_length=64, emb_dim=32, n_heads=4, n_layers=2, hidden_dim=48,
                      head_dim=16, n_kv_groups=2, rope_base=10000.0, tie_embeddings=False)
    torch.manual_seed(0)
    theirs = book.Qwen3Model({**cfg.to_dict(), "dtype": torch.float32}).eval()
    with torch.no_grad():
        for param_name, param in theirs.named_parameters():
            if param_name.endswith(".scale"):
                param.uniform_(0.5, 1.5)
    ours = Qwen3Model(cfg).eval()
    # The book's RMSNorm calls its weight `scale`; every other name is ours.
    ours.load_state_dict({k.removesuffix(".scale") + (".weight" if k.endswith(".scale") else ""): v
                          for k, v in theirs.state_dict().items()})
    x = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        assert _max_diff(ours(x), theirs(x)) < 1e-4


def test_kv_cache_equals_full_recompute():
    cfg = Qwen3Config(vocab_size=VOCAB, context_length=32, emb_dim=32, n_heads=4, n_layers=2, hidden_dim=48,
                      head_dim=16, n_kv_groups=2, rope_base=10000.0, qkv_bias=True)
    torch.manual_seed(0)
    model = Qwen3Model(cfg).eval()
    x = torch.randint(0, VOCAB, (2, 12))
    cache = model.new_kv_cache()
    with torch.no_grad():
        full = model(x)
        steps = [model(x[:, :5], kv_cache=cache), model(x[:, 5:8], kv_cache=cache)]  # prompt, then a chunk
        steps += [model(x[:, i:i + 1], kv_cache=cache) for i in range(8, 12)]  # then one token at a time
    assert cache.length == 12
    assert _max_diff(torch.cat(steps, dim=1), full) < 1e-4


def test_name_maps_follow_the_config():
    qwen2 = Qwen3Config(qk_norm=False, qkv_bias=True)
    assert hf_names(Qwen3Config()) == HF_NAMES and gguf_names(Qwen3Config()) == GGUF_NAMES
    assert "trf_blocks.{}.att.q_norm.weight" not in hf_names(qwen2)
    assert hf_names(qwen2)["trf_blocks.{}.att.W_key.bias"] == "model.layers.{}.self_attn.k_proj.bias"
    assert gguf_names(qwen2)["trf_blocks.{}.att.W_value.bias"] == "blk.{}.attn_v.bias"
    assert set(hf_names(qwen2)) == set(gguf_names(qwen2))
    assert set(hf_names(qwen2)) == {k.replace(".0.", ".{}.") for k in Qwen3Model(Qwen3Config(
        vocab_size=8, emb_dim=8, n_heads=2, n_kv_groups=1, n_layers=1, hidden_dim=8, head_dim=4, qk_norm=False,
        qkv_bias=True, tie_embeddings=False)).state_dict()}


class _Metadata:
    """Stand-in for loaders.gguf.GGUFMetadata: get("<key>") reads "<arch>.<key>"."""

    def __init__(self, arch: str, values: dict, tensor_names: set[str], vocab_size_from_tokens: int | None = None):
        self.arch, self.values, self.tensor_names = arch, values, tensor_names
        self.vocab_size_from_tokens = vocab_size_from_tokens

    def get(self, key: str, default=...):
        if f"{self.arch}.{key}" in self.values:
            return self.values[f"{self.arch}.{key}"]
        if default is ...:
            raise CheckpointError(f"the GGUF metadata lacks {self.arch}.{key!r}")
        return default


def _gguf_from_hf(hf, cfg) -> tuple[_Metadata, dict[str, torch.Tensor]]:
    """A GGUF file's metadata and tensors for a transformers model, as llama.cpp's converter names them."""
    c, arch = hf.config, hf.config.model_type
    values = {"block_count": c.num_hidden_layers, "context_length": c.max_position_embeddings,
              "embedding_length": c.hidden_size, "feed_forward_length": c.intermediate_size,
              "attention.head_count": c.num_attention_heads, "attention.head_count_kv": c.num_key_value_heads,
              "rope.freq_base": 10000.0, "attention.layer_norm_rms_epsilon": c.rms_norm_eps}
    if arch == "qwen3":
        values["attention.key_length"] = c.head_dim
    hf_to_gguf = {theirs: gguf_names(cfg)[ours] for ours, theirs in hf_names(cfg).items()}
    tensors = {}
    for hf_name, tensor in hf.state_dict().items():
        if not (cfg.tie_embeddings and hf_name == "lm_head.weight"):  # llama.cpp writes no tied output
            layer = re.match(r"model\.layers\.(\d+)\.", hf_name)
            pattern = hf_name.replace(layer.group(0), "model.layers.{}.") if layer else hf_name
            tensors[hf_to_gguf[pattern].format(layer.group(1) if layer else None)] = tensor
    metadata = _Metadata(arch, {f"{arch}.{k}": v for k, v in values.items()}, set(tensors), VOCAB)
    return metadata, tensors


@pytest.mark.parametrize("kind,tie", [("qwen3", True), ("qwen2", False)])
def test_config_and_tensors_from_gguf(tmp_path, kind, tie):
    hf = _tiny_hf(kind, tie=tie)
    reference = _load(hf, tmp_path)
    metadata, tensors = _gguf_from_hf(hf, reference.cfg)
    cfg = config_from_gguf(metadata, "tiny")
    assert cfg == reference.cfg
    model = Qwen3Model(cfg).eval()
    model.load_state_dict(rename_state(tensors, gguf_names(cfg), cfg, "tiny.gguf"))
    x = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        assert _max_diff(model(x), hf(x).logits) < 1e-4


def test_gguf_refusals():
    values = {"qwen3.block_count": 1, "qwen3.context_length": 8, "qwen3.embedding_length": 8,
              "qwen3.feed_forward_length": 8, "qwen3.attention.head_count": 2}
    with pytest.raises(CheckpointError, match="rope scaling of type 'yarn'"):
        config_from_gguf(_Metadata("qwen3", {**values, "qwen3.rope.scaling.type": "yarn"}, set(), 8), "x")
    with pytest.raises(CheckpointError, match="neither qwen3.vocab_size nor a token list"):
        config_from_gguf(_Metadata("qwen3", values, set()), "x")
    with pytest.raises(CheckpointError, match="block_count"):
        config_from_gguf(_Metadata("qwen3", {k: v for k, v in values.items() if "block" not in k}, set(), 8), "x")


def _hf_dict(**changes) -> dict:
    hf = transformers.Qwen3Config(**SIZES, head_dim=16).to_dict()
    hf.update(changes)
    return hf


def test_hf_config_refusals():
    assert config_from_hf(_hf_dict(), "x").rope_base == 10000.0  # rope_parameters, as transformers 5 writes
    assert config_from_hf({**_hf_dict(rope_theta=5e5), "rope_parameters": None}, "x").rope_base == 5e5  # older files
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    for changes in ({"rope_scaling": yarn}, {"rope_parameters": {"rope_theta": 1e6, **yarn}}):
        with pytest.raises(CheckpointError, match="rope"):
            config_from_hf(_hf_dict(**changes), "x")
    with pytest.raises(CheckpointError, match="use_sliding_window"):
        config_from_hf(_hf_dict(use_sliding_window=True), "x")
    with pytest.raises(CheckpointError, match="num_experts"):
        config_from_hf(_hf_dict(num_experts=8), "x")
    with pytest.raises(CheckpointError, match="attention_bias"):
        config_from_hf(_hf_dict(attention_bias=True), "x")
    for key in ("intermediate_size", "rope_parameters"):  # rope_parameters holds rope_theta
        hf = _hf_dict()
        del hf[key]
        with pytest.raises(CheckpointError, match=key.replace("parameters", "theta")):
            config_from_hf(hf, "x")


def test_invalid_sizes_are_config_errors():
    with pytest.raises(ConfigError, match="'bad'.*n_layers must be >= 1.*head_dim .7. must be even.*n_kv_groups .3."):
        Qwen3Config(head_dim=7, n_kv_groups=3, n_layers=0, name="bad")
    with pytest.raises(ConfigError, match="unknown Qwen3Config keys"):
        Qwen3Config.from_dict({"dtype": "bf16"})
    assert Qwen3Config.from_dict(Qwen3Config(name="x").to_dict()) == Qwen3Config(name="x")
