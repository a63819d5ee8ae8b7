"""Model configurations: typed, validated, with named presets kept as data."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llmclf.errors import ConfigError

DEFAULT_MODEL = "smollm2-135m"  # generate / lm-eval: the instruction-tuned model that works offline (PyPI)
DEFAULT_BACKBONE = "gemma3-270m"  # train: the cross-validated winner (README, bench/bench_backbones.py)

class DictConfig:
    """`from_dict` / `to_dict` for the config dataclasses (the book's plain-dict configs)."""

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> Any:
        """Build from a dict (`{"emb_dim": 768, ...}`); unknown keys are an error."""
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
        problems = []
        for key in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            if int(getattr(self, key)) < 1:
                problems.append(f"{key} must be >= 1, got {getattr(self, key)}")
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
        problems = [f"{key} must be >= 1, got {getattr(self, key)}"
                    for key in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "hidden_dim",
                                "n_kv_groups") if int(getattr(self, key)) < 1]
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
