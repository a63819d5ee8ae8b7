"""Llama-family decoder (SmolLM2, Llama 2/3 style), as the book converts its GPT into Llama.

RMSNorm instead of LayerNorm, rotary position embeddings instead of a position table, a SwiGLU
feed-forward (`fc1`, `fc2`, `fc3`), grouped-query attention through SDPA, and optionally tied
input/output embeddings. Qwen3 and Qwen2 are this model with three config switches (`head_dim`,
`qk_norm`, `qkv_bias`; see `models/qwen3.py`). The interfaces match `GPTModel` (forward, hidden_states, embed,
run_blocks, attention_inputs, KV cache), so generation, evaluation and classification work alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmclf.config import LlamaConfig
from llmclf.errors import CheckpointError, ConfigError
from llmclf.models.decoder import DecoderModel, KVCache, causal_padding_mask, mask_after_cache, rows_at

# Our names <- Hugging Face LlamaForCausalLM's ("{}" = block index)
HF_NAMES = {
    "tok_emb.weight": "model.embed_tokens.weight",
    "final_norm.weight": "model.norm.weight",
    "out_head.weight": "lm_head.weight",
    "trf_blocks.{}.att.W_query.weight": "model.layers.{}.self_attn.q_proj.weight",
    "trf_blocks.{}.att.W_key.weight": "model.layers.{}.self_attn.k_proj.weight",
    "trf_blocks.{}.att.W_value.weight": "model.layers.{}.self_attn.v_proj.weight",
    "trf_blocks.{}.att.out_proj.weight": "model.layers.{}.self_attn.o_proj.weight",
    "trf_blocks.{}.ff.fc1.weight": "model.layers.{}.mlp.gate_proj.weight",
    "trf_blocks.{}.ff.fc2.weight": "model.layers.{}.mlp.up_proj.weight",
    "trf_blocks.{}.ff.fc3.weight": "model.layers.{}.mlp.down_proj.weight",
    "trf_blocks.{}.norm1.weight": "model.layers.{}.input_layernorm.weight",
    "trf_blocks.{}.norm2.weight": "model.layers.{}.post_attention_layernorm.weight",
}
# Our names <- llama.cpp's GGUF names
GGUF_NAMES = {
    "tok_emb.weight": "token_embd.weight",
    "final_norm.weight": "output_norm.weight",
    "out_head.weight": "output.weight",
    "trf_blocks.{}.att.W_query.weight": "blk.{}.attn_q.weight",
    "trf_blocks.{}.att.W_key.weight": "blk.{}.attn_k.weight",
    "trf_blocks.{}.att.W_value.weight": "blk.{}.attn_v.weight",
    "trf_blocks.{}.att.out_proj.weight": "blk.{}.attn_output.weight",
    "trf_blocks.{}.ff.fc1.weight": "blk.{}.ffn_gate.weight",
    "trf_blocks.{}.ff.fc2.weight": "blk.{}.ffn_up.weight",
    "trf_blocks.{}.ff.fc3.weight": "blk.{}.ffn_down.weight",
    "trf_blocks.{}.norm1.weight": "blk.{}.attn_norm.weight",
    "trf_blocks.{}.norm2.weight": "blk.{}.ffn_norm.weight",
}


def rope_type(hf: dict) -> str:
    """The rope type of a config.json: older ones say `rope_scaling`, newer `rope_parameters`."""
    for key in ("rope_scaling", "rope_parameters"):
        params = hf.get(key)
        if isinstance(params, dict) and params.get("rope_type", params.get("type", "default")) != "default":
            return str(params.get("rope_type", params.get("type")))
    return "default"


def config_from_hf(hf: dict, name: str) -> LlamaConfig:
    """`LlamaConfig` from a Hugging Face Llama config.json."""
    if (kind := rope_type(hf)) != "default":
        raise CheckpointError(f"{name}: config.json asks for rope scaling of type {kind!r}, which llmclf does "
                              "not implement (rope_scaling / rope_parameters.rope_type must be 'default')")
    rope = hf.get("rope_parameters") or {}
    heads = hf["num_attention_heads"]
    return LlamaConfig(
        vocab_size=hf["vocab_size"], context_length=hf.get("max_position_embeddings", 2048),
        emb_dim=hf["hidden_size"], n_heads=heads, n_kv_groups=hf.get("num_key_value_heads") or heads,
        n_layers=hf["num_hidden_layers"], hidden_dim=hf["intermediate_size"],
        rope_base=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
        rms_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings", False)), name=name)


def config_from_gguf(metadata, name: str) -> LlamaConfig:  # noqa: ANN001 - loaders.gguf.GGUFMetadata
    """`LlamaConfig` from the metadata of a llama GGUF file."""
    scaling = metadata.get("rope.scaling.type", None)
    if scaling not in (None, "none"):
        raise CheckpointError(f"{name}: rope scaling of type {scaling!r} ({metadata.arch}.rope.scaling.type) is not "
                              "implemented by llmclf's Llama")
    heads = int(metadata.get("attention.head_count"))
    return LlamaConfig(
        vocab_size=int(metadata.get("vocab_size", None) or metadata.vocab_size_from_tokens),
        context_length=int(metadata.get("context_length")), emb_dim=int(metadata.get("embedding_length")),
        n_heads=heads, n_kv_groups=int(metadata.get("attention.head_count_kv", heads)),
        n_layers=int(metadata.get("block_count")), hidden_dim=int(metadata.get("feed_forward_length")),
        rope_base=float(metadata.get("rope.freq_base", 10000.0)),
        rms_eps=float(metadata.get("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in metadata.tensor_names, name=name)


class AttentionInputs(NamedTuple):
    """What every block needs besides x: the SDPA mask (None = plain causal) and the rotary
    cos/sin of each query position, (B or 1, 1, T, head_dim)."""

    mask: torch.Tensor | None
    cos: torch.Tensor
    sin: torch.Tensor


def compute_rope_params(head_dim: int, theta_base: float, context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (context_length, head_dim) in the rotate-half layout (as Hugging Face)."""
    inv_freq = 1.0 / (theta_base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.arange(context_length, dtype=torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) queries or keys by their positions' angles."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class FeedForward(nn.Module):
    """SwiGLU: fc3(silu(fc1(x)) * fc2(x)); Gemma's GeGLU with `activation` tanh-GELU."""

    def __init__(self, cfg: LlamaConfig, activation: Callable[[torch.Tensor], torch.Tensor] = F.silu) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.emb_dim, cfg.hidden_dim, bias=False)
        self.fc2 = nn.Linear(cfg.emb_dim, cfg.hidden_dim, bias=False)
        self.fc3 = nn.Linear(cfg.hidden_dim, cfg.emb_dim, bias=False)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.activation(self.fc1(x)) * self.fc2(x))


class GroupedQueryAttention(nn.Module):
    """Grouped-query attention through SDPA. Qwen3 adds a free head size and q/k RMSNorm, Qwen2 qkv
    biases; Gemma 3 its own RMSNorm (`norm`) and query scaling (`scale`, default 1/sqrt(head_dim))."""

    def __init__(self, d_in: int, num_heads: int, num_kv_groups: int, head_dim: int, qk_norm: bool = False,
                 qkv_bias: bool = False, rms_eps: float = 1e-6, dropout: float = 0.0, scale: float | None = None,
                 norm: type[nn.Module] = nn.RMSNorm) -> None:
        super().__init__()
        self.scale = scale
        self.num_heads = num_heads
        self.num_kv_groups = num_kv_groups
        self.head_dim = head_dim
        self.d_out = num_heads * head_dim
        self.W_query = nn.Linear(d_in, self.d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, num_kv_groups * head_dim, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, num_kv_groups * head_dim, bias=qkv_bias)
        self.out_proj = nn.Linear(self.d_out, d_in, bias=False)
        if qk_norm:
            self.q_norm = norm(head_dim, eps=rms_eps)
            self.k_norm = norm(head_dim, eps=rms_eps)
        else:
            self.q_norm = self.k_norm = None
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, kv_cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        b, num_tokens, _ = x.shape
        queries = self.W_query(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        keys = self.W_key(x).view(b, num_tokens, self.num_kv_groups, self.head_dim).transpose(1, 2)
        values = self.W_value(x).view(b, num_tokens, self.num_kv_groups, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            queries, keys = self.q_norm(queries), self.k_norm(keys)
        queries = apply_rope(queries, inputs.cos, inputs.sin)
        keys = apply_rope(keys, inputs.cos, inputs.sin)

        past, mask = 0, inputs.mask
        if kv_cache is not None:
            past = kv_cache.length
            keys, values = kv_cache.update(layer, keys, values)  # (B, H_kv, S, D): cached before expansion
        mask = mask_after_cache(mask, past, num_tokens, x.device)
        context_vec = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=mask,
            dropout_p=self.dropout.p if self.training else 0.0,
            is_causal=mask is None and past == 0 and num_tokens > 1,
            scale=self.scale, enable_gqa=self.num_kv_groups != self.num_heads,
        )
        return self.out_proj(context_vec.transpose(1, 2).reshape(b, num_tokens, self.d_out))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.att = GroupedQueryAttention(cfg.emb_dim, cfg.n_heads, cfg.n_kv_groups, cfg.attention_head_dim,
                                         cfg.qk_norm, cfg.qkv_bias, cfg.rms_eps, cfg.drop_rate)
        self.ff = FeedForward(cfg)
        self.norm1 = nn.RMSNorm(cfg.emb_dim, eps=cfg.rms_eps)
        self.norm2 = nn.RMSNorm(cfg.emb_dim, eps=cfg.rms_eps)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, kv_cache: KVCache | None = None,
                layer: int = 0, only_at: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, C) -> (B, T, C), or only the rows at `only_at` (B,) after attention: (B, 1, C)."""
        shortcut, att = x, self.att(self.norm1(x), inputs, kv_cache, layer)
        if only_at is not None:
            shortcut, att = rows_at(shortcut, only_at), rows_at(att, only_at)
        x = shortcut + att
        return x + self.ff(self.norm2(x))


class LlamaModel(DecoderModel):
    """Llama. `forward(in_idx)` maps token ids (B, T) to logits (B, T, vocab_size)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.trf_blocks = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = nn.RMSNorm(cfg.emb_dim, eps=cfg.rms_eps)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.out_head.weight = self.tok_emb.weight
        cos, sin = compute_rope_params(cfg.attention_head_dim, cfg.rope_base, cfg.context_length)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @property
    def context_length(self) -> int:
        return self.cfg.context_length

    def embed(self, in_idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
              kv_cache: KVCache | None = None) -> tuple[torch.Tensor, AttentionInputs]:
        past = self.past_length(in_idx, kv_cache)
        return self.tok_emb(in_idx), self.attention_inputs(attention_mask, in_idx.shape[1], past)

    def attention_inputs(self, attention_mask: torch.Tensor | None, num_queries: int,
                         past: int = 0) -> AttentionInputs:
        """Mask and rotary angles for the last `num_queries` positions; with a padding mask,
        positions count real tokens only (so padding side does not matter)."""
        if attention_mask is None:
            positions = torch.arange(past, past + num_queries, device=self.cos.device)
            return AttentionInputs(None, self.cos[positions][None, None], self.sin[positions][None, None])
        attention_mask = attention_mask.bool()
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -num_queries:]
        return AttentionInputs(causal_padding_mask(attention_mask, num_queries),
                               self.cos[positions][:, None], self.sin[positions][:, None])


def hf_decoder_fields(cfg: LlamaConfig) -> dict[str, Any]:
    """The config.json fields that Hugging Face's Llama, Qwen3 and Qwen2 configs share, for `cfg`."""
    return {"vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.context_length,
            "hidden_size": cfg.emb_dim, "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_groups,
            "head_dim": cfg.attention_head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.rms_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
            "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": cfg.drop_rate}


def config_to_hf(cfg: LlamaConfig) -> dict[str, Any]:
    """A Hugging Face Llama `config.json` (as a dict) for `cfg`: the inverse of `config_from_hf`."""
    if cfg.qk_norm or cfg.qkv_bias:
        raise ConfigError(f"{cfg.name}: Hugging Face's Llama has neither q/k norms nor qkv-only biases "
                          f"(qk_norm={cfg.qk_norm}, qkv_bias={cfg.qkv_bias}); such a model belongs to the qwen3 family")
    return {"model_type": "llama", **hf_decoder_fields(cfg), "attention_bias": False, "mlp_bias": False}
