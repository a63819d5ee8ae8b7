"""Gemma 3 (text) decoder, as the book's bonus material builds Gemma 3 270M from scratch.

Gemma 3 is Llama with a few changes: RMSNorm scales by `1 + weight` (computed in float32), every
block normalises before and after both attention and feed-forward, queries and keys get RMSNorm
per head (`q_norm`, `k_norm`), queries are scaled by `query_pre_attn_scalar ** -0.5`, the
feed-forward is GeGLU (tanh GELU), token embeddings are scaled by sqrt(emb_dim), and most layers
attend only to a sliding window of recent tokens (with their own rotary base); every sixth layer
attends to the whole context. Padding and positions are handled as in `models/llama.py`, so left
and right padding give the same logits and classification reads one row of the last block.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmclf.config import DictConfig, size_problem
from llmclf.errors import CheckpointError, ConfigError
from llmclf.models import llama
from llmclf.models.decoder import DecoderModel, KVCache, causal_padding_mask, rows_at
from llmclf.models.llama import AttentionInputs, FeedForward, GroupedQueryAttention, compute_rope_params

LAYER_TYPES = ("sliding_attention", "full_attention")


def default_layer_types(n_layers: int, pattern: int = 6) -> list[str]:
    """Gemma 3's layout: every `pattern`-th layer attends to the full context, the others to a window."""
    if problem := size_problem("n_layers", n_layers):  # a hostile config.json must not make it loop 1e9 times
        raise ConfigError(f"invalid Gemma3 config: {problem}")
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers)]


@dataclass
class Gemma3Config(DictConfig):
    """Gemma 3 architecture settings, under the book's names. Defaults are Gemma 3 270M."""

    vocab_size: int = 262_144
    context_length: int = 32_768
    emb_dim: int = 640
    n_heads: int = 4
    n_layers: int = 18
    hidden_dim: int = 2048  # GeGLU width
    head_dim: int = 256  # per attention head; n_heads * head_dim may differ from emb_dim
    qk_norm: bool = True  # RMSNorm on every query and key head
    n_kv_groups: int = 1  # key/value heads; each serves n_heads / n_kv_groups query heads
    rope_local_base: float = 10_000.0  # rotary base of the sliding-window layers
    rope_base: float = 1_000_000.0  # rotary base of the full-attention layers
    sliding_window: int = 512  # a sliding layer's query sees itself and the sliding_window - 1 tokens before
    layer_types: list[str] | None = None  # "sliding_attention" / "full_attention" per block; None = every 6th full
    query_pre_attn_scalar: float = 256.0  # attention scores are scaled by query_pre_attn_scalar ** -0.5
    rms_eps: float = 1e-6
    tie_embeddings: bool = True  # out_head shares tok_emb's weight
    drop_rate: float = 0.0  # attention dropout while training (released models use none)
    name: str = "custom-gemma3"

    def __post_init__(self) -> None:
        wrong_types, problems = self.field_problems()
        if wrong_types or problems:  # before the layer list, which has n_layers entries
            raise ConfigError(f"invalid Gemma3 config {self.name!r}: " + "; ".join(wrong_types + problems))
        if self.layer_types is None:
            self.layer_types = default_layer_types(self.n_layers)
        self.layer_types = list(self.layer_types)
        if self.head_dim % 2:
            problems.append(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.n_kv_groups >= 1 and self.n_heads % self.n_kv_groups:
            problems.append(f"n_heads ({self.n_heads}) must be divisible by n_kv_groups ({self.n_kv_groups})")
        if len(self.layer_types) != self.n_layers:
            problems.append(f"layer_types has {len(self.layer_types)} entries for n_layers={self.n_layers}")
        if bad := sorted({str(t) for t in self.layer_types} - set(LAYER_TYPES)):
            problems.append(f"unknown layer_types {bad}; use {' or '.join(LAYER_TYPES)}")
        for key in ("rope_local_base", "rope_base", "query_pre_attn_scalar", "rms_eps"):
            if not getattr(self, key) > 0:
                problems.append(f"{key} must be > 0, got {getattr(self, key)}")
        if not 0.0 <= self.drop_rate < 1.0:
            problems.append(f"drop_rate must be in [0, 1), got {self.drop_rate}")
        if problems:
            raise ConfigError(f"invalid Gemma3 config {self.name!r}: " + "; ".join(problems))


class Gemma3Inputs(NamedTuple):
    """What the blocks need besides x: mask and rotary angles for each kind of layer."""

    full: AttentionInputs  # causal + padding mask, rotary base rope_base
    sliding: AttentionInputs  # also hides keys sliding_window or more positions back; base rope_local_base


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: scales by (1 + weight), in float32; weight starts at zero."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_f = x.float()
        x_norm = x_f * torch.rsqrt(x_f.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (x_norm * (1.0 + self.weight.float())).to(x.dtype)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: Gemma3Config, layer_type: str) -> None:
        super().__init__()
        self.sliding = layer_type == "sliding_attention"
        self.att = GroupedQueryAttention(cfg.emb_dim, cfg.n_heads, cfg.n_kv_groups, cfg.head_dim, cfg.qk_norm,
                                         rms_eps=cfg.rms_eps, dropout=cfg.drop_rate,
                                         scale=cfg.query_pre_attn_scalar ** -0.5, norm=RMSNorm)
        self.ff = FeedForward(cfg, activation=partial(F.gelu, approximate="tanh"))  # GeGLU
        self.input_layernorm = RMSNorm(cfg.emb_dim, eps=cfg.rms_eps)
        self.post_attention_layernorm = RMSNorm(cfg.emb_dim, eps=cfg.rms_eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.emb_dim, eps=cfg.rms_eps)
        self.post_feedforward_layernorm = RMSNorm(cfg.emb_dim, eps=cfg.rms_eps)

    def forward(self, x: torch.Tensor, inputs: Gemma3Inputs, kv_cache: KVCache | None = None,
                layer: int = 0, only_at: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, C) -> (B, T, C), or only the rows at `only_at` (B,) after attention: (B, 1, C)."""
        att_inputs = inputs.sliding if self.sliding else inputs.full
        shortcut, att = x, self.att(self.input_layernorm(x), att_inputs, kv_cache, layer)
        if only_at is not None:
            shortcut, att = rows_at(shortcut, only_at), rows_at(att, only_at)
        x = shortcut + self.post_attention_layernorm(att)
        return x + self.post_feedforward_layernorm(self.ff(self.pre_feedforward_layernorm(x)))


class Gemma3Model(DecoderModel):
    """Gemma 3 (text). `forward(in_idx)` maps token ids (B, T) to logits (B, T, vocab_size)."""

    def __init__(self, cfg: Gemma3Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.trf_blocks = nn.ModuleList([TransformerBlock(cfg, layer_type) for layer_type in cfg.layer_types])
        self.final_norm = RMSNorm(cfg.emb_dim, eps=cfg.rms_eps)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.out_head.weight = self.tok_emb.weight
        cos_local, sin_local = compute_rope_params(cfg.head_dim, cfg.rope_local_base, cfg.context_length)
        cos, sin = compute_rope_params(cfg.head_dim, cfg.rope_base, cfg.context_length)
        self.register_buffer("cos_local", cos_local, persistent=False)
        self.register_buffer("sin_local", sin_local, persistent=False)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @property
    def context_length(self) -> int:
        return self.cfg.context_length

    def embed(self, in_idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
              kv_cache: KVCache | None = None) -> tuple[torch.Tensor, Gemma3Inputs]:
        """Scaled token embeddings (B, T, C) and the blocks' attention inputs."""
        past = self.past_length(in_idx, kv_cache)
        x = self.tok_emb(in_idx)
        x = x * torch.tensor(self.cfg.emb_dim ** 0.5, dtype=x.dtype)  # the normalizer rounded to x's dtype, as Gemma
        return x, self.attention_inputs(attention_mask, in_idx.shape[1], past)

    def attention_inputs(self, attention_mask: torch.Tensor | None, num_queries: int,
                         past: int = 0) -> Gemma3Inputs:
        """Masks and rotary angles for the last `num_queries` positions; with a padding mask,
        positions count real tokens only (so padding side does not matter)."""
        if attention_mask is None:
            positions = torch.arange(past, past + num_queries, device=self.cos.device)[None]
            full_mask = sliding_mask = None  # plain causal: SDPA's is_causal
            if past > 0 or num_queries > self.cfg.sliding_window:
                no_padding = torch.ones(1, past + num_queries, dtype=torch.bool, device=self.cos.device)
                full_mask, sliding_mask = self._masks(no_padding, num_queries)
                full_mask = full_mask if past > 0 else None
        else:
            attention_mask = attention_mask.bool()
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -num_queries:]
            full_mask, sliding_mask = self._masks(attention_mask, num_queries)
        return Gemma3Inputs(
            AttentionInputs(full_mask, self.cos[positions][:, None], self.sin[positions][:, None]),
            AttentionInputs(sliding_mask, self.cos_local[positions][:, None], self.sin_local[positions][:, None]))

    def _masks(self, attention_mask: torch.Tensor, num_queries: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(full, sliding) boolean SDPA masks (B, 1, T, S) for a (B, S) padding mask."""
        full = causal_padding_mask(attention_mask, num_queries)
        positions = attention_mask.long().cumsum(-1)  # counts real tokens, so padding inside the window is free
        in_window = positions[:, None, :] > positions[:, -num_queries:, None] - self.cfg.sliding_window  # (B, T, S)
        return full, full & in_window[:, None]


# Checkpoint names: ours -> theirs, "{}" = the block index. Llama's attention and feed-forward
# names, Gemma's four norms per block and q/k norms. Transformers' Gemma3ForCausalLM (model_type
# "gemma3_text") does not write a tied lm_head.weight; llama.cpp (architecture gemma3) stores every
# norm weight as 1 + weight (the family's gguf_norm_offset undoes that) and the q/k rows unpermuted.
_NORMS = {"input_layernorm": ("input_layernorm", "attn_norm"),
          "post_attention_layernorm": ("post_attention_layernorm", "post_attention_norm"),
          "pre_feedforward_layernorm": ("pre_feedforward_layernorm", "ffn_norm"),
          "post_feedforward_layernorm": ("post_feedforward_layernorm", "post_ffw_norm")}
HF_NAMES: dict[str, str] = {
    **{k: v for k, v in llama.HF_NAMES.items() if ".norm" not in k},
    **{f"trf_blocks.{{}}.{ours}.weight": f"model.layers.{{}}.{hf}.weight" for ours, (hf, _) in _NORMS.items()},
    "final_norm.weight": "model.norm.weight",
    "trf_blocks.{}.att.q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",
    "trf_blocks.{}.att.k_norm.weight": "model.layers.{}.self_attn.k_norm.weight",
}
GGUF_NAMES: dict[str, str] = {
    **{k: v for k, v in llama.GGUF_NAMES.items() if ".norm" not in k},
    **{f"trf_blocks.{{}}.{ours}.weight": f"blk.{{}}.{gguf}.weight" for ours, (_, gguf) in _NORMS.items()},
    "final_norm.weight": "output_norm.weight",
    "trf_blocks.{}.att.q_norm.weight": "blk.{}.attn_q_norm.weight",
    "trf_blocks.{}.att.k_norm.weight": "blk.{}.attn_k_norm.weight",
}


def _rope_bases(hf: Mapping[str, Any], name: str) -> tuple[float, float]:
    """(full, sliding) rotary bases of a config.json, refusing rope scaling.

    Transformers 5 writes `rope_parameters` {"full_attention": {...}, "sliding_attention": {...}};
    older files `rope_theta`, `rope_local_base_freq` and `rope_scaling` (for the full layers)."""
    params = hf.get("rope_parameters") or {}
    nested = "full_attention" in params or "sliding_attention" in params
    full = (params.get("full_attention") or {}) if nested else params
    sliding = (params.get("sliding_attention") or {}) if nested else {}
    for field, value in (("rope_scaling", hf.get("rope_scaling") or {}),
                         ("rope_parameters.full_attention" if nested else "rope_parameters", full),
                         ("rope_parameters.sliding_attention", sliding)):
        rope_type = value.get("rope_type", value.get("type", "default"))
        if rope_type != "default":
            raise CheckpointError(f"{name}: rope scaling of type {rope_type!r} ({field}) is not supported")
    return (float(full.get("rope_theta", hf.get("rope_theta", 1_000_000.0))),
            float(sliding.get("rope_theta", hf.get("rope_local_base_freq", 10_000.0))))


def config_from_hf(hf: Mapping[str, Any], name: str) -> Gemma3Config:
    """Our config from a Hugging Face config.json of model_type "gemma3_text".

    Fields the model does not implement (rope scaling, logit soft-capping, another activation,
    bidirectional attention, attention biases) are a CheckpointError naming them, as is a missing
    key; keys transformers itself defaults (rope bases, query_pre_attn_scalar, rms_norm_eps,
    tie_word_embeddings, layer_types) take transformers' defaults."""
    if hf.get("model_type", "gemma3_text") != "gemma3_text":
        raise CheckpointError(f"{name}: model_type {hf.get('model_type')!r} is not gemma3_text")
    rope_base, rope_local_base = _rope_bases(hf, name)
    for field in ("attn_logit_softcapping", "final_logit_softcapping"):
        if hf.get(field) is not None:
            raise CheckpointError(f"{name}: {field}={hf[field]} is not supported")
    if (activation := hf.get("hidden_activation", "gelu_pytorch_tanh")) != "gelu_pytorch_tanh":
        raise CheckpointError(f"{name}: hidden_activation {activation!r} is not supported (only gelu_pytorch_tanh)")
    for field in ("use_bidirectional_attention", "attention_bias"):
        if hf.get(field):
            raise CheckpointError(f"{name}: {field}=true is not supported")
    try:
        n_layers = int(hf["num_hidden_layers"])
        layer_types = hf.get("layer_types") or default_layer_types(
            n_layers, int(hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))))
        return Gemma3Config(
            vocab_size=int(hf["vocab_size"]), context_length=int(hf["max_position_embeddings"]),
            emb_dim=int(hf["hidden_size"]), n_heads=int(hf["num_attention_heads"]), n_layers=n_layers,
            hidden_dim=int(hf["intermediate_size"]), head_dim=int(hf["head_dim"]),
            n_kv_groups=int(hf["num_key_value_heads"]), rope_local_base=rope_local_base, rope_base=rope_base,
            sliding_window=int(hf["sliding_window"]), layer_types=list(layer_types),
            query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
            rms_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            name=name)
    except KeyError as exc:
        raise CheckpointError(f"{name}: config.json lacks the key {exc}") from exc
    except TypeError as exc:  # e.g. "sliding_window": null
        raise CheckpointError(f"{name}: config.json has a null or malformed value ({exc})") from exc


def config_from_gguf(metadata: Any, name: str) -> Gemma3Config:
    """Our config from the GGUF metadata of a gemma3 file (`loaders.gguf.GGUFMetadata`).

    llama.cpp stores neither the local rotary base (10000), the layer layout (every sixth layer
    full) nor the query scale (1/sqrt(key_length); emb_dim / n_heads for the 62-layer 27B): it
    hard-codes them, and so do we."""
    scaling = metadata.get("rope.scaling.type", None)
    if scaling not in (None, "none"):
        raise CheckpointError(f"{name}: rope scaling of type {scaling!r} (rope.scaling.type) is not supported")
    vocab_size = metadata.get("vocab_size", None) or metadata.vocab_size_from_tokens
    if vocab_size is None:
        raise CheckpointError(f"{name}: the GGUF file has neither {metadata.arch}.vocab_size nor a token list")
    emb_dim, n_heads = int(metadata.get("embedding_length")), int(metadata.get("attention.head_count"))
    n_layers, head_dim = int(metadata.get("block_count")), int(metadata.get("attention.key_length", 256))
    return Gemma3Config(
        vocab_size=int(vocab_size), context_length=int(metadata.get("context_length")), emb_dim=emb_dim,
        n_heads=n_heads, n_layers=n_layers, hidden_dim=int(metadata.get("feed_forward_length")),
        head_dim=head_dim, n_kv_groups=int(metadata.get("attention.head_count_kv", n_heads)),
        rope_local_base=10_000.0, rope_base=float(metadata.get("rope.freq_base", 1_000_000.0)),
        sliding_window=int(metadata.get("attention.sliding_window")), layer_types=default_layer_types(n_layers),
        query_pre_attn_scalar=float(emb_dim // n_heads if n_layers == 62 else head_dim),
        rms_eps=float(metadata.get("attention.layer_norm_rms_epsilon", 1e-6)),
        tie_embeddings="output.weight" not in metadata.tensor_names, name=name)


def config_to_hf(cfg: Gemma3Config) -> dict[str, Any]:
    """A Hugging Face Gemma 3 text `config.json` (as a dict, model_type "gemma3_text") for `cfg`: the
    inverse of `config_from_hf`, with the rotary bases in Transformers 5's per-layer-type `rope_parameters`."""
    if not cfg.qk_norm:
        raise ConfigError(f"{cfg.name}: Hugging Face's Gemma 3 always has q/k norms; qk_norm=False cannot be written")
    return {"model_type": "gemma3_text", "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.context_length,
            "hidden_size": cfg.emb_dim, "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_groups, "head_dim": cfg.head_dim,
            "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": cfg.rms_eps,
            "sliding_window": cfg.sliding_window, "layer_types": list(cfg.layer_types),
            "query_pre_attn_scalar": cfg.query_pre_attn_scalar, "tie_word_embeddings": cfg.tie_embeddings,
            "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": cfg.rope_base},
                                "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_base}},
            "attn_logit_softcapping": None, "final_logit_softcapping": None, "attention_bias": False,
            "use_bidirectional_attention": False, "attention_dropout": cfg.drop_rate}
