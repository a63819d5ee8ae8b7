"""Hugging Face model directories (config.json + safetensors) of a registered family."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from llmclf.errors import CheckpointError
from llmclf.families import Family, family_for_hf
from llmclf.loaders.tensors import read_tensor_file

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
SHARD_INDEX = "model.safetensors.index.json"


def read_hf_dir(path: str | os.PathLike) -> tuple[Family, Any, dict[str, torch.Tensor]]:
    """(family, config, state dict in our names) of a Hugging Face directory.

    Weights come from `model.safetensors`, its shards (`model.safetensors.index.json`), or
    `pytorch_model.bin` (read with `weights_only=True`)."""
    path = Path(path)
    try:
        hf = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}/config.json is missing or not valid JSON: {exc}") from exc
    family = family_for_hf(str(hf.get("model_type")), str(path))
    try:
        cfg = family.config_from_hf(hf, path.name)
    except KeyError as exc:
        raise CheckpointError(f"{path}/config.json lacks the key {exc}") from exc
    return family, cfg, family.rename_from_hf(_read_weights(path), cfg, str(path))


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    index = path / SHARD_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, AttributeError) as exc:
            raise CheckpointError(f"{index} is not a safetensors shard index: {exc}") from exc
        tensors = {}
        for shard in shards:
            shard_path = (path / shard).resolve()
            if shard_path.parent != path.resolve():
                raise CheckpointError(f"{index} names a shard outside the model directory: {shard!r}")
            tensors.update(read_tensor_file(shard_path))
        return tensors
    for filename in WEIGHT_FILES:
        if (path / filename).is_file():
            return read_tensor_file(path / filename)
    raise CheckpointError(f"{path} has config.json but no weights ({', '.join(WEIGHT_FILES)} or {SHARD_INDEX})")
