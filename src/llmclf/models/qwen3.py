"""Qwen3 (dense) decoder, and Qwen2/2.5 through the same code, as the book's `qwen3.py` builds it.

Qwen3 is Llama with an explicit head size (`head_dim`, not necessarily emb_dim / n_heads) and
RMSNorm on each query and key head before the rotary embedding (`q_norm`, `k_norm`). Qwen2 and
Qwen2.5 have no q/k norm but biases on the query/key/value projections (`qkv_bias`). The rotary
embedding, SwiGLU feed-forward and the padding/position handling are Llama's (`models/llama.py`),
so left and right padding give the same logits and classification reads one row of the last block.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llmclf.config import LlamaConfig
from llmclf.errors import CheckpointError, ConfigError
from llmclf.models import llama
from llmclf.models.llama import LlamaModel


@dataclass
class Qwen3Config(LlamaConfig):
    """Qwen3 architecture settings, under the book's names. Defaults are Qwen3-0.6B."""

    vocab_size: int = 151936
    context_length: int = 40960
    emb_dim: int = 1024
    n_heads: int = 16
    n_kv_groups: int = 8
    n_layers: int = 28
    hidden_dim: int = 3072  # SwiGLU width
    rope_base: float = 1_000_000.0
    rms_eps: float = 1e-6
    head_dim: int | None = 128  # n_heads * head_dim may differ from emb_dim
    qk_norm: bool = True  # Qwen3; Qwen2 has none
    name: str = "custom-qwen3"


class Qwen3Model(LlamaModel):
    """Qwen3 (or Qwen2). `forward(in_idx)` maps token ids (B, T) to logits (B, T, vocab_size);
    the blocks are Llama's, switched by the config (`head_dim`, `qk_norm`, `qkv_bias`)."""


# Checkpoint names: ours -> theirs, "{}" = the block index: Llama's, plus Qwen3's q/k norms (and
# Qwen2's biases through `hf_names(cfg)` / `gguf_names(cfg)`). llama.cpp stores Qwen's q/k rows unpermuted.
HF_NAMES: dict[str, str] = {
    **llama.HF_NAMES,
    "trf_blocks.{}.att.q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",
    "trf_blocks.{}.att.k_norm.weight": "model.layers.{}.self_attn.k_norm.weight",
}
GGUF_NAMES: dict[str, str] = {
    **llama.GGUF_NAMES,
    "trf_blocks.{}.att.q_norm.weight": "blk.{}.attn_q_norm.weight",
    "trf_blocks.{}.att.k_norm.weight": "blk.{}.attn_k_norm.weight",
}

_QK_NORM = ("trf_blocks.{}.att.q_norm.weight", "trf_blocks.{}.att.k_norm.weight")
_PROJECTIONS = {"W_query": ("q_proj", "attn_q"), "W_key": ("k_proj", "attn_k"), "W_value": ("v_proj", "attn_v")}
_HF_BIASES = {f"trf_blocks.{{}}.att.{ours}.bias": f"model.layers.{{}}.self_attn.{hf}.bias"
              for ours, (hf, _) in _PROJECTIONS.items()}
_GGUF_BIASES = {f"trf_blocks.{{}}.att.{ours}.bias": f"blk.{{}}.{gguf}.bias" for ours, (_, gguf) in _PROJECTIONS.items()}


def _names_for(names: Mapping[str, str], biases: Mapping[str, str], cfg: Qwen3Config) -> dict[str, str]:
    selected = {ours: theirs for ours, theirs in names.items() if cfg.qk_norm or ours not in _QK_NORM}
    return {**selected, **biases} if cfg.qkv_bias else selected


def hf_names(cfg: Qwen3Config) -> dict[str, str]:
    """Our name -> Hugging Face name for this config (q/k norms only with qk_norm, biases with qkv_bias)."""
    return _names_for(HF_NAMES, _HF_BIASES, cfg)


def gguf_names(cfg: Qwen3Config) -> dict[str, str]:
    """Our name -> GGUF name for this config (q/k norms only with qk_norm, biases with qkv_bias)."""
    return _names_for(GGUF_NAMES, _GGUF_BIASES, cfg)


def config_from_hf(hf: Mapping[str, Any], name: str) -> Qwen3Config:
    """Our config from a Hugging Face config.json of model_type "qwen3" or "qwen2" (Qwen2.5 included).

    Fields the model does not implement (rope scaling, sliding-window attention, experts, Qwen3's
    attention_bias) are a CheckpointError naming them, as is a missing key."""
    model_type = hf.get("model_type")
    if model_type not in ("qwen3", "qwen2"):
        raise CheckpointError(f"{name}: model_type {model_type!r} is not qwen3 or qwen2")
    if (kind := llama.rope_type(hf)) != "default":
        raise CheckpointError(f"{name}: rope scaling of type {kind!r} (rope_scaling / rope_parameters) "
                              "is not supported")
    if hf.get("use_sliding_window") or any(t != "full_attention" for t in hf.get("layer_types") or ()):
        raise CheckpointError(f"{name}: sliding-window attention (use_sliding_window / layer_types) is not supported")
    if hf.get("num_experts") or hf.get("num_local_experts"):
        raise CheckpointError(f"{name}: mixture-of-experts layers (num_experts) are not supported")
    if model_type == "qwen3" and hf.get("attention_bias"):
        raise CheckpointError(f"{name}: attention_bias is not supported for qwen3")
    rope_base = hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta"))
    try:
        if rope_base is None:
            raise KeyError("rope_theta")
        return Qwen3Config(
            vocab_size=int(hf["vocab_size"]), context_length=int(hf["max_position_embeddings"]),
            emb_dim=int(hf["hidden_size"]), n_heads=int(hf["num_attention_heads"]),
            n_layers=int(hf["num_hidden_layers"]), hidden_dim=int(hf["intermediate_size"]),
            head_dim=int(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]),
            qk_norm=model_type == "qwen3",
            n_kv_groups=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
            rope_base=float(rope_base), rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=model_type == "qwen2", name=name)
    except KeyError as exc:
        raise CheckpointError(f"{name}: config.json lacks the key {exc}") from exc


def config_from_gguf(metadata: Any, name: str) -> Qwen3Config:
    """Our config from the GGUF metadata of a qwen3 or qwen2 file (`loaders.gguf.GGUFMetadata`).

    Q/k norms, qkv biases and a separate output head are read off which tensors the file has."""
    scaling = metadata.get("rope.scaling.type", None)
    if scaling not in (None, "none"):
        raise CheckpointError(f"{name}: rope scaling of type {scaling!r} (rope.scaling.type) is not supported")
    vocab_size = metadata.get("vocab_size", None) or metadata.vocab_size_from_tokens
    if vocab_size is None:
        raise CheckpointError(f"{name}: the GGUF file has neither {metadata.arch}.vocab_size nor a token list")
    emb_dim, n_heads = int(metadata.get("embedding_length")), int(metadata.get("attention.head_count"))
    return Qwen3Config(
        vocab_size=int(vocab_size), context_length=int(metadata.get("context_length")), emb_dim=emb_dim,
        n_heads=n_heads, n_layers=int(metadata.get("block_count")),
        hidden_dim=int(metadata.get("feed_forward_length")),
        head_dim=int(metadata.get("attention.key_length", emb_dim // n_heads)),
        qk_norm="blk.0.attn_q_norm.weight" in metadata.tensor_names,
        n_kv_groups=int(metadata.get("attention.head_count_kv", n_heads)),
        rope_base=float(metadata.get("rope.freq_base", 1_000_000.0)),
        rms_eps=float(metadata.get("attention.layer_norm_rms_epsilon", 1e-6)),
        tie_embeddings="output.weight" not in metadata.tensor_names,
        qkv_bias="blk.0.attn_q.bias" in metadata.tensor_names, name=name)


def config_to_hf(cfg: Qwen3Config) -> dict[str, Any]:
    """A Hugging Face config.json (as a dict) for `cfg`: model_type "qwen3" (q/k norms) or "qwen2" (qkv
    biases), the inverse of `config_from_hf`; a config with both or neither is a ConfigError."""
    if cfg.qk_norm == cfg.qkv_bias:
        raise ConfigError(f"{cfg.name}: Hugging Face has Qwen3 (q/k norms, no qkv biases) and Qwen2 (qkv biases, "
                          f"no q/k norms), not qk_norm={cfg.qk_norm} with qkv_bias={cfg.qkv_bias}")
    model_type = "qwen3" if cfg.qk_norm else "qwen2"
    extra = {"attention_bias": False} if model_type == "qwen3" else {}
    return {"model_type": model_type, **llama.hf_decoder_fields(cfg), **extra, "use_sliding_window": False}
