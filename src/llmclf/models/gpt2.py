"""GPT-2, written as in "Build a Large Language Model (From Scratch)", made fast.

Module names, parameter names and construction order are the book's (`GPTModel`, `tok_emb`,
`trf_blocks[i].att.W_query`, `norm1.scale`, `out_head`, ...), so a state_dict saved by the book's
code loads unchanged and `torch.manual_seed(123); GPTModel(cfg)` gives the book's initial weights.
Speed comes from `scaled_dot_product_attention`, fused layer norm / GELU kernels and a KV cache.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmclf.config import GPTConfig
from llmclf.errors import CheckpointError, ConfigError
from llmclf.models.decoder import DecoderModel, KVCache, causal_padding_mask, mask_after_cache, rows_at


class LayerNorm(nn.Module):
    """The book's LayerNorm (`scale`, `shift`, eps 1e-5), computed by the fused kernel."""

    def __init__(self, emb_dim: int) -> None:
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.scale.shape, self.scale, self.shift, self.eps)


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim),
            nn.GELU(approximate="tanh"),  # the book's GELU is this tanh approximation
            nn.Linear(4 * cfg.emb_dim, cfg.emb_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention through `F.scaled_dot_product_attention`."""

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int,
                 qkv_bias: bool = False) -> None:
        super().__init__()
        if d_out % num_heads:
            raise ConfigError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads})")
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.context_length = context_length

        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """x: (B, T, C). mask: boolean (B, 1, T, S), True = may attend; None = plain causal."""
        b, num_tokens, _ = x.shape
        # (B, T, C) -> (B, H, T, D)
        queries = self.W_query(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        keys = self.W_key(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        values = self.W_value(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)

        past = 0
        if kv_cache is not None:
            past = kv_cache.length
            keys, values = kv_cache.update(layer, keys, values)
        mask = mask_after_cache(mask, past, num_tokens, x.device)

        context_vec = F.scaled_dot_product_attention(
            queries, keys, values,
            attn_mask=mask,
            dropout_p=self.dropout.p if self.training else 0.0,
            # With cached keys a single new query may see everything; otherwise causal.
            is_causal=mask is None and past == 0 and num_tokens > 1,
        )
        context_vec = context_vec.transpose(1, 2).reshape(b, num_tokens, self.d_out)
        return self.out_proj(context_vec)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        # The book registers its causal mask as a buffer, so its checkpoints carry `att.mask`;
        # SDPA needs no such buffer, so it is dropped instead of reported as unexpected.
        state_dict.pop(prefix + "mask", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.att = MultiHeadAttention(
            d_in=cfg.emb_dim,
            d_out=cfg.emb_dim,
            context_length=cfg.context_length,
            num_heads=cfg.n_heads,
            dropout=cfg.drop_rate,
            qkv_bias=cfg.qkv_bias,
        )
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg.emb_dim)
        self.norm2 = LayerNorm(cfg.emb_dim)
        self.drop_resid = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, layer: int = 0,
                only_at: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, C) -> (B, T, C); with `only_at` (B,) position indices, only those rows (B, 1, C)
        go on after attention, which saves the feed-forward of every other position."""
        shortcut, att = x, self.att(self.norm1(x), mask, kv_cache, layer)
        if only_at is not None:
            shortcut, att = rows_at(shortcut, only_at), rows_at(att, only_at)
        x = shortcut + self.drop_resid(att)
        x = x + self.drop_resid(self.ff(self.norm2(x)))
        return x


class GPTModel(DecoderModel):
    """GPT-2. `forward(in_idx)` maps token ids (B, T) to logits (B, T, vocab_size).

    `cfg` is a `GPTConfig` or the book's config dict. After `out_head` is replaced by a
    `Linear(emb_dim, num_classes)`, the same forward gives class logits at every position.
    """

    def __init__(self, cfg: GPTConfig | Mapping[str, Any]) -> None:
        super().__init__()  # DecoderModel adds no parameters: the book's init order is kept
        cfg = cfg if isinstance(cfg, GPTConfig) else GPTConfig.from_dict(cfg)
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)

        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg.n_layers)])

        self.final_norm = LayerNorm(cfg.emb_dim)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)

    @property
    def context_length(self) -> int:
        return self.pos_emb.weight.shape[0]

    def embed(self, in_idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
              kv_cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token + position embeddings (B, T, C) and the attention mask the blocks use."""
        _, num_tokens = in_idx.shape
        past = kv_cache.length if kv_cache is not None else 0
        if past + num_tokens > self.context_length:
            raise ValueError(
                f"{past + num_tokens} tokens exceed the model's context length of {self.context_length}; "
                "truncate the input or build the model with a larger --context-length")
        if attention_mask is None:
            positions = torch.arange(past, past + num_tokens, device=in_idx.device)
        else:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        x = self.tok_emb(in_idx) + self.pos_emb(positions)
        return self.drop_emb(x), self.attention_inputs(attention_mask, num_tokens)

    def attention_inputs(self, attention_mask: torch.Tensor | None, num_queries: int) -> torch.Tensor | None:
        """What the blocks need besides x: the SDPA mask for the last `num_queries` positions."""
        return None if attention_mask is None else causal_padding_mask(attention_mask.bool(), num_queries)


# ours <- Hugging Face, per block ("{}" is the block index). Conv1D weights are stored (in, out).
_BLOCK_MAP = {
    "trf_blocks.{}.norm1.scale": "h.{}.ln_1.weight",
    "trf_blocks.{}.norm1.shift": "h.{}.ln_1.bias",
    "trf_blocks.{}.att.out_proj.weight": "h.{}.attn.c_proj.weight",
    "trf_blocks.{}.att.out_proj.bias": "h.{}.attn.c_proj.bias",
    "trf_blocks.{}.norm2.scale": "h.{}.ln_2.weight",
    "trf_blocks.{}.norm2.shift": "h.{}.ln_2.bias",
    "trf_blocks.{}.ff.layers.0.weight": "h.{}.mlp.c_fc.weight",
    "trf_blocks.{}.ff.layers.0.bias": "h.{}.mlp.c_fc.bias",
    "trf_blocks.{}.ff.layers.2.weight": "h.{}.mlp.c_proj.weight",
    "trf_blocks.{}.ff.layers.2.bias": "h.{}.mlp.c_proj.bias",
}
_TOP_MAP = {
    "tok_emb.weight": "wte.weight",
    "pos_emb.weight": "wpe.weight",
    "final_norm.scale": "ln_f.weight",
    "final_norm.shift": "ln_f.bias",
}


def config_from_hf(hf_config: dict, name: str = "custom") -> GPTConfig:
    """`GPTConfig` from a Hugging Face GPT-2 `config.json` (dropout set to 0 for inference)."""
    try:
        return GPTConfig(
            vocab_size=hf_config["vocab_size"],
            context_length=hf_config.get("n_positions", hf_config.get("n_ctx", 1024)),
            emb_dim=hf_config["n_embd"],
            n_heads=hf_config["n_head"],
            n_layers=hf_config["n_layer"],
            drop_rate=0.0,
            qkv_bias=True,
            name=name,
        )
    except KeyError as exc:
        raise CheckpointError(f"GPT-2 config.json lacks the key {exc}") from exc


def state_from_hf(hf_state: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Rename and reshape a Hugging Face GPT-2 state dict into `GPTModel`'s names.

    Accepts `GPT2LMHeadModel` (`transformer.` prefix) and `GPT2Model` keys; splits the fused
    `c_attn` projection into W_query/W_key/W_value and transposes Conv1D weights. The output
    head is tied to the token embedding unless the checkpoint has its own `lm_head.weight`.
    """
    hf = {k.removeprefix("transformer."): v for k, v in hf_state.items()}
    hf = {k: v for k, v in hf.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # buffers

    def take(key: str) -> torch.Tensor:
        if key not in hf:
            raise CheckpointError(f"GPT-2 checkpoint lacks the tensor {key!r}")
        return hf.pop(key)

    ours = {name: take(hf_name) for name, hf_name in _TOP_MAP.items()}
    for i in range(cfg.n_layers):
        for name, hf_name in _BLOCK_MAP.items():
            tensor = take(hf_name.format(i))
            ours[name.format(i)] = tensor.T if tensor.ndim == 2 else tensor
        qkv_w = take(f"h.{i}.attn.c_attn.weight").T  # (3 * C, C)
        qkv_b = take(f"h.{i}.attn.c_attn.bias")
        for part, w, b in zip(("W_query", "W_key", "W_value"), qkv_w.chunk(3), qkv_b.chunk(3), strict=True):
            ours[f"trf_blocks.{i}.att.{part}.weight"] = w
            ours[f"trf_blocks.{i}.att.{part}.bias"] = b
    lm_head = hf.pop("lm_head.weight", None)
    ours["out_head.weight"] = lm_head if lm_head is not None else ours["tok_emb.weight"]
    if hf:
        raise CheckpointError(f"GPT-2 checkpoint has tensors this config does not use: {sorted(hf)[:5]}")
    return {k: v.contiguous() for k, v in ours.items()}


def config_to_hf(cfg: GPTConfig) -> dict[str, Any]:
    """A Hugging Face GPT-2 `config.json` (as a dict) for `cfg`: the inverse of `config_from_hf`. Our
    GELU is GPT-2's tanh approximation (`gelu_new`); without qkv biases `state_to_hf` writes zero ones."""
    return {"model_type": "gpt2", "vocab_size": cfg.vocab_size, "n_positions": cfg.context_length,
            "n_embd": cfg.emb_dim, "n_head": cfg.n_heads, "n_layer": cfg.n_layers, "n_inner": None,
            "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "resid_pdrop": cfg.drop_rate,
            "embd_pdrop": cfg.drop_rate, "attn_pdrop": cfg.drop_rate, "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False}


def state_to_hf(state: Mapping[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Our `GPTModel` state dict in Hugging Face GPT-2's names, the inverse of `state_from_hf`.

    Names carry the `transformer.` prefix (as `GPT2LMHeadModel` and `GPT2ForSequenceClassification`
    have them); W_query/W_key/W_value are fused into `c_attn` (zero biases when `cfg.qkv_bias` is
    off) and Conv1D weights transposed; `out_head.weight`, when present, becomes `lm_head.weight`.
    """
    ours = dict(state)

    def take(key: str) -> torch.Tensor:
        if key not in ours:
            raise CheckpointError(f"the GPT-2 state dict lacks the tensor {key!r}")
        return ours.pop(key)

    hf = {f"transformer.{hf_name}": take(name) for name, hf_name in _TOP_MAP.items()}
    for i in range(cfg.n_layers):
        for name, hf_name in _BLOCK_MAP.items():
            tensor = take(name.format(i))
            hf[f"transformer.{hf_name.format(i)}"] = tensor.T if tensor.ndim == 2 else tensor
        parts = [f"trf_blocks.{i}.att.{part}" for part in ("W_query", "W_key", "W_value")]
        weights = [take(f"{part}.weight") for part in parts]  # each (C, C)
        biases = [ours.pop(f"{part}.bias", None) for part in parts]
        biases = [torch.zeros_like(w[:, 0]) if b is None else b for w, b in zip(weights, biases, strict=True)]
        hf[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat(weights).T  # Conv1D: (C, 3 * C)
        hf[f"transformer.h.{i}.attn.c_attn.bias"] = torch.cat(biases)
    if "out_head.weight" in ours:
        hf["lm_head.weight"] = ours.pop("out_head.weight")
    if ours:
        raise ConfigError(f"Hugging Face GPT-2 has no name for the tensors {sorted(ours)[:5]}")
    return {k: v.contiguous() for k, v in hf.items()}
