"""What every decoder here shares: the KV cache, the padding mask, and the forward plumbing.

A model subclasses `DecoderModel` and provides `tok_emb`, `trf_blocks`, `final_norm`, `out_head`,
`context_length`, `embed(in_idx, attention_mask, kv_cache) -> (x, inputs)` and
`attention_inputs(attention_mask, num_queries)`, where `inputs` is whatever its blocks take
besides x (a mask for GPT-2; mask plus rotary angles for Llama).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn


class KVCache:
    """Keys and values of the tokens already processed, one slot per transformer block.

    Buffers are allocated once for `max_length` tokens; each forward pass writes its new
    keys/values after the `length` cached ones (every block's `update` writes at the same
    offset); `length` advances only once all blocks have run, in `DecoderModel.hidden_states`
    (which `forward` calls and `generate` calls directly).
    """

    def __init__(self, n_layers: int, max_length: int) -> None:
        self.max_length = max_length
        self.length = 0
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, H, T, D) keys/values of `layer`; return all cached ones, (B, H, length + T, D)."""
        end = self.length + keys.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} tokens, {end} requested")
        if self.keys[layer] is None or self.keys[layer].dtype != keys.dtype:
            b, h, _, d = keys.shape
            self.keys[layer] = keys.new_empty(b, h, self.max_length, d)
            self.values[layer] = values.new_empty(b, h, self.max_length, d)
        self.keys[layer][:, :, self.length : end] = keys
        self.values[layer][:, :, self.length : end] = values
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class DecoderModel(nn.Module):
    """forward / hidden_states / run_blocks / new_kv_cache over a subclass's embed and blocks."""

    def past_length(self, in_idx: torch.Tensor, kv_cache: KVCache | None) -> int:
        """Tokens already in `kv_cache` (0 without one); a ValueError if `in_idx` would overflow the context."""
        past = kv_cache.length if kv_cache is not None else 0
        if past + in_idx.shape[1] > self.context_length:
            raise ValueError(f"{past + in_idx.shape[1]} tokens exceed the model's context length of "
                             f"{self.context_length}; truncate the input")
        return past

    def new_kv_cache(self, max_length: int | None = None) -> KVCache:
        return KVCache(len(self.trf_blocks), max_length or self.context_length)

    def forward(self, in_idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, out_features) for token ids `in_idx` (B, T).

        Args:
            attention_mask: optional (B, S) with 1 for real tokens and 0 for padding, where S is
                the number of cached tokens plus T. Padding is never attended to, and positions
                count real tokens only, so left and right padding give the same logits.
            kv_cache: optional `KVCache`; the new tokens' keys/values are appended to it.
        """
        return self.out_head(self.hidden_states(in_idx, attention_mask, kv_cache))

    def hidden_states(self, in_idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      kv_cache: KVCache | None = None) -> torch.Tensor:
        """The final-norm output (B, T, emb_dim) that `out_head` reads."""
        x, inputs = self.embed(in_idx, attention_mask, kv_cache)
        x = self.run_blocks(x, inputs, kv_cache=kv_cache)
        if kv_cache is not None:
            kv_cache.length += in_idx.shape[1]
        return self.final_norm(x)

    def run_blocks(self, x: torch.Tensor, inputs: Any, start: int = 0, stop: int | None = None,
                   kv_cache: KVCache | None = None) -> torch.Tensor:
        """Transformer blocks `start:stop` on hidden states x (B, T, C)."""
        for layer in range(start, len(self.trf_blocks) if stop is None else stop):
            x = self.trf_blocks[layer](x, inputs, kv_cache, layer)
        return x


def rows_at(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The row of each sequence at its position: x (B, T, C), positions (B,) -> (B, 1, C)."""
    return x[torch.arange(x.shape[0], device=x.device), positions][:, None]


def causal_padding_mask(attention_mask: torch.Tensor, num_queries: int) -> torch.Tensor:
    """Boolean SDPA mask (B, 1, T, S): causal, padding keys hidden, True = may attend.

    The queries are the last `num_queries` of the S positions. A padding query would see no
    key at all (a NaN row), so it is allowed to see itself; its output is never used.
    """
    total = attention_mask.shape[1]
    query_pos = torch.arange(total - num_queries, total, device=attention_mask.device)
    key_pos = torch.arange(total, device=attention_mask.device)
    causal = key_pos[None, :] <= query_pos[:, None]  # (T, S)
    mask = causal[None] & attention_mask[:, None, :]  # (B, T, S)
    mask = mask | (key_pos[None, None, :] == query_pos[None, :, None])
    return mask[:, None]


def mask_after_cache(mask: torch.Tensor | None, past: int, num_tokens: int,
                     device: torch.device) -> torch.Tensor | None:
    """The SDPA mask of `num_tokens` new queries after `past` cached tokens: `mask` if given; a causal
    one when several new tokens follow cached ones (SDPA's `is_causal` aligns to the top-left corner,
    which is wrong there); else None (plain causal, or one query that may see everything)."""
    if mask is None and past > 0 and num_tokens > 1:
        return causal_padding_mask(torch.ones(1, past + num_tokens, dtype=torch.bool, device=device), num_tokens)
    return mask
