"""Llama-family decoder (SmolLM2, Llama 2/3 style), as the book converts its GPT into Llama.

RMSNorm instead of LayerNorm, rotary position embeddings instead of a position table, a SwiGLU
feed-forward (`fc1`, `fc2`, `fc3`), grouped-query attention through SDPA, and optionally tied
input/output embeddings. The interfaces match `GPTModel` (forward, hidden_states, embed,
run_blocks, attention_inputs, KV cache), so generation, evaluation and classification work alike.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmclf.config import LlamaConfig
from llmclf.models.decoder import DecoderModel, KVCache, causal_padding_mask, rows_at


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
    """SwiGLU: fc3(silu(fc1(x)) * fc2(x))."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.emb_dim, cfg.hidden_dim, bias=False)
        self.fc2 = nn.Linear(cfg.emb_dim, cfg.hidden_dim, bias=False)
        self.fc3 = nn.Linear(cfg.hidden_dim, cfg.emb_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.silu(self.fc1(x)) * self.fc2(x))


class GroupedQueryAttention(nn.Module):
    def __init__(self, d_in: int, d_out: int, num_heads: int, num_kv_groups: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_groups = num_kv_groups
        self.head_dim = d_out // num_heads
        self.d_out = d_out
        self.W_query = nn.Linear(d_in, d_out, bias=False)
        self.W_key = nn.Linear(d_in, num_kv_groups * self.head_dim, bias=False)
        self.W_value = nn.Linear(d_in, num_kv_groups * self.head_dim, bias=False)
        self.out_proj = nn.Linear(d_out, d_out, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, kv_cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        b, num_tokens, _ = x.shape
        queries = self.W_query(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        keys = self.W_key(x).view(b, num_tokens, self.num_kv_groups, self.head_dim).transpose(1, 2)
        values = self.W_value(x).view(b, num_tokens, self.num_kv_groups, self.head_dim).transpose(1, 2)
        queries = apply_rope(queries, inputs.cos, inputs.sin)
        keys = apply_rope(keys, inputs.cos, inputs.sin)

        past = 0
        if kv_cache is not None:
            past = kv_cache.length
            keys, values = kv_cache.update(layer, keys, values)  # (B, H_kv, S, D): cached before expansion
        context_vec = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=inputs.mask,
            dropout_p=self.dropout.p if self.training else 0.0,
            is_causal=inputs.mask is None and past == 0 and num_tokens > 1,
            enable_gqa=self.num_kv_groups != self.num_heads,
        )
        return self.out_proj(context_vec.transpose(1, 2).reshape(b, num_tokens, self.d_out))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.att = GroupedQueryAttention(cfg.emb_dim, cfg.emb_dim, cfg.n_heads, cfg.n_kv_groups, cfg.drop_rate)
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
        cos, sin = compute_rope_params(cfg.emb_dim // cfg.n_heads, cfg.rope_base, cfg.context_length)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @property
    def context_length(self) -> int:
        return self.cfg.context_length

    def embed(self, in_idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
              kv_cache: KVCache | None = None) -> tuple[torch.Tensor, AttentionInputs]:
        past = kv_cache.length if kv_cache is not None else 0
        if past + in_idx.shape[1] > self.context_length:
            raise ValueError(f"{past + in_idx.shape[1]} tokens exceed the model's context length of "
                             f"{self.context_length}; truncate the input")
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
