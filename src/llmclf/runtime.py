"""Device and numeric precision: where a model runs and in which float type."""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

from llmclf.errors import ConfigError

Precision = Literal["auto", "float32", "bfloat16"]
PRECISIONS = ("auto", "float32", "bfloat16")


def resolve_device(device: str | None = None) -> torch.device:
    """`None`/"auto" -> CUDA if present, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def fast_bfloat16(device: torch.device) -> bool:
    """Whether bfloat16 matmuls are fast here: a CUDA GPU with bf16, or a CPU with AMX tiles."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        is_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
        return bool(is_amx and is_amx())
    return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """Compute dtype for `precision`: "auto" is bfloat16 only where `fast_bfloat16(device)`."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return torch.bfloat16 if fast_bfloat16(device) else torch.float32
    return torch.bfloat16 if precision == "bfloat16" else torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for `dtype` bfloat16 (weights stay float32); a no-op for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
