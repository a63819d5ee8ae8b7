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


def _cpu_bf16_units() -> list[str]:
    """The CPU's native bfloat16 matmul units: AMX tiles (Xeon Sapphire Rapids on) and AVX512-BF16
    (e.g. AMD EPYC Zen 4, where bf16 matmuls measured 2.6x float32). AVX2-only CPUs have neither."""
    checks = {"AMX": "_is_amx_tile_supported", "AVX512-BF16": "_is_avx512_bf16_supported"}
    return [name for name, fn in checks.items() if getattr(torch.cpu, fn, lambda: False)()]


def fast_bfloat16(device: torch.device) -> bool:
    """Whether bfloat16 matmuls are fast here: a CUDA GPU with bf16, or a CPU with AMX or AVX512-BF16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(_cpu_bf16_units())
    return False


def auto_precision_note() -> str:
    """What `--precision auto` picks on this machine, and why (for --help)."""
    if torch.cuda.is_available():
        dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
        return f"here: {dtype} on {torch.cuda.get_device_name(0)}"
    units = _cpu_bf16_units()
    if units:
        return f"here: bfloat16 (this CPU has {' and '.join(units)})"
    return "here: float32 (this CPU has neither AMX nor AVX512-BF16, so bfloat16 would be slower)"


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
