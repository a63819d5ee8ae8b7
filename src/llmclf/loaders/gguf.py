"""GGUF files (llama.cpp) -> a registered family's config and float32 state dict."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmclf.errors import CheckpointError
from llmclf.families import Family, family_for_gguf

_REQUIRED = object()


class GGUFMetadata:
    """The key/value metadata of a GGUF file, read relative to its architecture's prefix."""

    def __init__(self, reader: Any, source: str) -> None:
        self.reader = reader
        self.source = source
        self.arch = str(self.raw("general.architecture"))
        self.tensor_names = {t.name for t in reader.tensors}
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        self.vocab_size_from_tokens = len(tokens.data) if tokens is not None else None

    def raw(self, key: str, default: Any = _REQUIRED) -> Any:
        """The value of `key` as written (e.g. "general.name")."""
        field = self.reader.fields.get(key)
        if field is None:
            if default is _REQUIRED:
                raise CheckpointError(f"{self.source}: the GGUF metadata lacks {key!r}")
            return default
        return field.contents()

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        """The value of "<architecture>.<key>" (e.g. `get("block_count")`)."""
        return self.raw(f"{self.arch}.{key}", default)


def open_gguf(path: str | os.PathLike) -> GGUFMetadata:
    """The metadata of a GGUF file, with a clear error for a missing, truncated or foreign file."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file not found: {path}")
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError, struct and mmap errors for bad files
        raise CheckpointError(f"{path} is not a readable GGUF file (truncated or corrupt?): "
                              f"{type(exc).__name__}: {exc}") from exc
    return GGUFMetadata(reader, str(path))


def read_gguf(path: str | os.PathLike) -> tuple[Family, Any, dict[str, torch.Tensor]]:
    """(family, config, float32 state dict) of a GGUF file of a registered architecture.

    Every quantisation type the `gguf` package can dequantise is read (Q4_K, Q5_K, Q6_K, ...);
    llama.cpp's per-family conversions (Llama's q/k row order, Gemma's `1 + weight` norms) are undone.
    """
    metadata = open_gguf(path)
    family = family_for_gguf(metadata.arch, metadata.source)
    name = str(metadata.raw("general.name", Path(path).stem))
    try:
        cfg = family.config_from_gguf(metadata, name)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: GGUF metadata does not describe a {family.name} model ({exc})") from exc
    return family, cfg, family.rename_from_gguf(dequantize_tensors(metadata), cfg, metadata.source)


def dequantize_tensors(metadata: GGUFMetadata) -> dict[str, torch.Tensor]:
    """Every tensor of the file as float32, named as in the file."""
    from gguf.quants import dequantize

    tensors = {}
    for tensor in metadata.reader.tensors:
        qtype = tensor.tensor_type.name
        try:
            array = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as exc:
            raise CheckpointError(f"{metadata.source}: tensor {tensor.name} has quantisation type {qtype}, "
                                  f"which the gguf package cannot dequantise ({exc})") from exc
        except Exception as exc:
            raise CheckpointError(f"{metadata.source}: tensor {tensor.name} ({qtype}) cannot be read "
                                  f"(truncated file?): {type(exc).__name__}: {exc}") from exc
        tensors[tensor.name] = torch.from_numpy(np.array(array, dtype=np.float32))  # writable copy
    return tensors
