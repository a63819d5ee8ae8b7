"""Device and numeric precision: where a model runs and in which float type."""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn

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


class _LowPrecisionCopies:
    """One model's nn.Linear weights and biases in a low-precision dtype, made for one state of them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.key: tuple | None = None
        self.copies: list[dict[str, nn.Parameter]] = []


_COPIES: weakref.WeakKeyDictionary[nn.Module, _LowPrecisionCopies] = weakref.WeakKeyDictionary()
_COPIES_LOCK = threading.Lock()


@contextlib.contextmanager
def inference_autocast(model: nn.Module, device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """`autocast` for inference (no gradients) with `model`, whose nn.Linear layers meanwhile hold
    `dtype` copies of their weights and biases.

    Autocast casts each float32 weight again at every forward pass (its cache lasts one context and
    skips frozen weights). The copies are made once, and again only after the float32 weights change,
    and give the same numbers: autocast would round them the same way. Not for training: the copies
    have no gradients. Threads that share a model take turns."""
    if dtype == torch.float32:
        yield
        return
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    with _COPIES_LOCK:
        entry = _COPIES.setdefault(model, _LowPrecisionCopies())
    with entry.lock:
        # The float32 weights changed if an optimizer step or load_state_dict wrote into them (_version),
        # .data or .to() replaced their storage (data_ptr), or a module got new ones (id).
        key = (dtype, tuple((id(p), p._version, p.data_ptr())
                            for m in linears for p in m._parameters.values() if p is not None))
        if entry.key != key:
            entry.key, entry.copies = None, []  # free the old copies before making new ones
            entry.copies = [{name: nn.Parameter(p.detach().to(dtype), requires_grad=False)
                             for name, p in m._parameters.items() if p is not None} for m in linears]
            entry.key = key
        originals = [dict(m._parameters) for m in linears]
        try:
            for m, copies in zip(linears, entry.copies, strict=True):
                m._parameters.update(copies)
            with autocast(device, dtype):
                yield
        finally:
            for m, params in zip(linears, originals, strict=True):
                m._parameters.update(params)
