"""Model configurations: typed, validated, with named presets kept as data."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llmclf.errors import ConfigError

DEFAULT_MODEL = "smollm2-135m"  # generate / lm-eval: the instruction-tuned model that works offline (PyPI)
DEFAULT_BACKBONE = "gemma3-270m"  # train: the cross-validated winner (README, bench/bench_backbones.py)

# Far above every released model (Llama 3.1 405B: 126 layers, 16,384 wide, 53,248 SwiGLU; Gemma 3:
# 262,144 tokens; Qwen2.5-1M: 1,010,000 positions). A config.json beyond them is corrupt or hostile:
# it is refused before anything is allocated for it (`n_layers: 1e9` would otherwise build a billion
# blocks). The loaders also check that the weights file holds every tensor the config implies.
SIZE_LIMITS = {"vocab_size": 1 << 22, "context_length": 1 << 21, "emb_dim": 1 << 16, "hidden_dim": 1 << 18,
               "n_heads": 1 << 12, "n_kv_groups": 1 << 12, "head_dim": 1 << 12, "n_layers": 1 << 10,
               "sliding_window": 1 << 21}


def size_problem(key: str, value: Any) -> str | None:
    """Why `value` is not a valid `key` (an integer from 1 to SIZE_LIMITS[key]), else None."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{key} must be an integer, got {_short_repr(value)}"
    if value < 1:
        return f"{key} must be >= 1, got {value}"
    if value > SIZE_LIMITS[key]:
        return f"{key} must be <= {SIZE_LIMITS[key]:,} (larger than any released model), got {value:,}"
    return None


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list"}


def _is_kind(value: Any, kind: type) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, list | tuple) if kind is list else isinstance(value, kind)


class DictConfig:
    """`from_dict` / `to_dict` for the config dataclasses (the book's plain-dict configs)."""

    def field_problems(self) -> tuple[list[str], list[str]]:
        """(fields of the wrong type, sizes out of range: see SIZE_LIMITS). A config's `__post_init__`
        checks these first, before it derives anything from the values."""
        wrong_types, bad_sizes = [], []
        for name, hint in typing.get_type_hints(type(self)).items():
            value = getattr(self, name)
            union = typing.get_origin(hint) in (typing.Union, types.UnionType)
            allowed = [typing.get_origin(k) or k for k in (typing.get_args(hint) if union else (hint,))]
            if value is None and type(None) in allowed:
                continue
            kinds = [k for k in allowed if k is not type(None)]
            if not any(_is_kind(value, kind) for kind in kinds):
                wanted = " or ".join(_KINDS.get(kind, kind.__name__) for kind in kinds)
                wrong_types.append(f"{name} must be {wanted}, got {_short_repr(value)}")
            elif name in SIZE_LIMITS and (problem := size_problem(name, value)):
                bad_sizes.append(problem)
        return wrong_types, bad_sizes

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> Any:
        """Build from a dict (`{"emb_dim": 768, ...}`); unknown keys are an error."""
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"a {cls.__name__} must be a mapping of settings, got {_short_repr(cfg)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(cfg) - fields
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} keys: {sorted(unknown)}; expected some of {sorted(fields)}")
        return cls(**dict(cfg))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class GPTConfig(DictConfig):
    """GPT-2 architecture settings, under the book's names.

    Defaults are GPT-2 small as OpenAI released it (context 1024, qkv bias on, no dropout).
    """

    vocab_size: int = 50257  # GPT-2 BPE vocabulary
    context_length: int = 1024  # longest sequence the position embedding covers
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.0  # the book trains from scratch with 0.1; released weights use 0.0
    qkv_bias: bool = True  # GPT-2 checkpoints have biases on the query/key/value projections
    name: str = "custom"

    def __post_init__(self) -> None:
        wrong_types, problems = self.field_problems()
        if wrong_types:  # the checks below need numbers
            raise ConfigError(f"invalid GPT config {self.name!r}: " + "; ".join(wrong_types))
        if self.n_heads >= 1 and self.emb_dim % self.n_heads:
            problems.append(f"emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})")
        if not 0.0 <= self.drop_rate < 1.0:
            problems.append(f"drop_rate must be in [0, 1), got {self.drop_rate}")
        if problems:
            raise ConfigError(f"invalid GPT config {self.name!r}: " + "; ".join(problems))

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> GPTConfig:
        """Build a preset (`gpt2-small` ... `gpt2-xl`), with optional overrides (`None` values ignored)."""
        from llmclf.families import FAMILIES

        presets = FAMILIES["gpt2"].presets
        if name not in presets:
            raise ConfigError(f"unknown model config {name!r}; valid names: {', '.join(presets)}")
        values = {**presets[name], **{k: v for k, v in overrides.items() if v is not None}}
        return cls(name=name, **values)


@dataclass
class LlamaConfig(DictConfig):
    """Llama architecture settings, under the book's names."""

    vocab_size: int = 49152
    context_length: int = 8192
    emb_dim: int = 576
    n_heads: int = 9
    n_kv_groups: int = 3  # key/value heads; each serves n_heads / n_kv_groups query heads
    n_layers: int = 30
    hidden_dim: int = 1536  # SwiGLU width
    rope_base: float = 100000.0
    rms_eps: float = 1e-5
    tie_embeddings: bool = True  # out_head shares tok_emb's weight
    drop_rate: float = 0.0  # attention dropout while training (released models use none)
    head_dim: int | None = None  # per attention head (None: emb_dim // n_heads; Qwen3 sets its own)
    qk_norm: bool = False  # RMSNorm on every query and key head before RoPE (Qwen3)
    qkv_bias: bool = False  # biases on the query/key/value projections (Qwen2/2.5)
    name: str = "custom-llama"

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim or self.emb_dim // self.n_heads

    def __post_init__(self) -> None:
        wrong_types, problems = self.field_problems()
        if wrong_types:  # the checks below need numbers
            raise ConfigError(f"invalid config {self.name!r}: " + "; ".join(wrong_types))
        if self.head_dim is None and self.n_heads >= 1 and self.emb_dim % self.n_heads:
            problems.append(f"emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})")
        elif self.n_heads >= 1 and self.attention_head_dim % 2:
            problems.append(f"head_dim ({self.attention_head_dim}) must be even for rotary embeddings")
        if self.n_kv_groups >= 1 and self.n_heads % self.n_kv_groups:
            problems.append(f"n_heads ({self.n_heads}) must be divisible by n_kv_groups ({self.n_kv_groups})")
        if not 0.0 <= self.drop_rate < 1.0:
            problems.append(f"drop_rate must be in [0, 1), got {self.drop_rate}")
        if problems:
            raise ConfigError(f"invalid config {self.name!r}: " + "; ".join(problems))
