"""GGUF files (llama.cpp) -> a registered family's config and float32 state dict."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmclf.errors import CheckpointError, ConfigError
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
    """The metadata of a GGUF file, with a clear error for a missing, truncated, foreign or lying file
    (counts, sizes or offsets beyond the file, overlapping tensors)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file not found: {path}")
    try:
        reader = _bounded_reader_class()(path)
    except Exception as exc:  # the reader raises ValueError, struct and mmap errors for bad files
        raise CheckpointError(f"{path} is not a readable GGUF file (truncated or corrupt?): "
                              f"{type(exc).__name__}: {exc}") from exc
    _check_tensor_layout(reader, str(path))
    return GGUFMetadata(reader, str(path))


def _bounded_reader_class() -> type:
    """`gguf.GGUFReader`, made to refuse what lies beyond the end of the file.

    The reader slices a memmap, and a slice past the end is silently short (empty at the end), so a
    metadata array that claims 2**40 elements would loop 2**40 times, growing a list of empty arrays:
    here every read past the end, and every array longer than the bytes left, is a ValueError."""
    import numpy.typing as npt
    from gguf import GGUFReader, GGUFValueType

    class BoundedGGUFReader(GGUFReader):
        def _get(self, offset: int, dtype: npt.DTypeLike, count: int = 1, override_order: Any = None) -> Any:
            end = offset + np.dtype(dtype).itemsize * int(count)
            if end > len(self.data):
                raise ValueError(f"a field at byte {offset:,} needs {end - offset:,} bytes, "
                                 f"but the file ends at byte {len(self.data):,}")
            return super()._get(offset, dtype, count, override_order)

        def _get_field_parts(self, orig_offs: int, raw_type: int) -> Any:
            if raw_type == GGUFValueType.ARRAY:
                item_type = GGUFValueType(int(self._get(orig_offs, np.uint32)[0]))
                count = int(self._get(orig_offs + 4, np.uint64)[0])
                scalar = self.gguf_scalar_to_np.get(item_type)
                smallest = np.dtype(scalar).itemsize if scalar is not None else 8  # a string or array: >= 8
                if count * smallest > len(self.data) - orig_offs - 12:
                    raise ValueError(f"a metadata array at byte {orig_offs:,} claims {count:,} elements, "
                                     "more than the rest of the file holds")
            return super()._get_field_parts(orig_offs, raw_type)

    return BoundedGGUFReader


def _check_tensor_layout(reader: Any, source: str) -> None:
    """Each tensor's bytes lie inside the file's data section and no two overlap, so dequantizing
    cannot allocate more than the file's size justifies."""
    end_of_file = len(reader.data)
    previous_end, previous = 0, None
    for tensor in sorted(reader.tensors, key=lambda t: t.data_offset):
        start, size = int(tensor.data_offset), int(tensor.data.nbytes)
        if size != int(tensor.n_bytes) or start + size > end_of_file:
            raise CheckpointError(f"{source}: tensor {tensor.name} claims {int(tensor.n_bytes):,} bytes at byte "
                                  f"{start:,}, beyond the end of the file ({end_of_file:,} bytes): truncated "
                                  "or corrupt")
        if start < previous_end:
            raise CheckpointError(f"{source}: tensors {previous} and {tensor.name} overlap in the file; corrupt")
        previous_end, previous = start + size, tensor.name


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
    except (ConfigError, TypeError, ValueError, ArithmeticError) as exc:
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
