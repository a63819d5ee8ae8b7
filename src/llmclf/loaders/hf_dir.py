"""Hugging Face model directories (config.json + safetensors) of a registered family."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from llmclf.errors import CheckpointError, ConfigError
from llmclf.families import Family, family_for_hf
from llmclf.loaders.paths import model_file
from llmclf.loaders.tensors import read_tensor_file

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
SHARD_INDEX = "model.safetensors.index.json"


def read_hf_dir(path: str | os.PathLike) -> tuple[Family, Any, dict[str, torch.Tensor]]:
    """(family, config, state dict in our names) of a Hugging Face directory.

    Weights come from `model.safetensors`, its shards (`model.safetensors.index.json`), or
    `pytorch_model.bin` (read with `weights_only=True`)."""
    path = Path(path)
    try:
        hf = json.loads(model_file(path, "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}/config.json is missing or not valid JSON: {exc}") from exc
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path}/config.json is not a JSON object")
    family = family_for_hf(str(hf.get("model_type")), str(path))
    try:
        cfg = family.config_from_hf(hf, path.name)
    except KeyError as exc:
        raise CheckpointError(f"{path}/config.json lacks the key {exc}") from exc
    except (ConfigError, TypeError, ValueError, ArithmeticError) as exc:  # e.g. "num_hidden_layers": "many"
        raise CheckpointError(f"{path}/config.json does not describe a valid {family.name} model: {exc}") from exc
    return family, cfg, family.rename_from_hf(_read_weights(path), cfg, str(path))


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    index = model_file(path, SHARD_INDEX)
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, AttributeError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a safetensors shard index: {exc}") from exc
        if not all(isinstance(shard, str) for shard in shards):
            raise CheckpointError(f"{index} is not a safetensors shard index: its weight_map values must be file names")
        paths = [model_file(path, shard, source=str(index)) for shard in shards]  # all checked before any is read
        tensors = {}
        for shard_path in paths:
            tensors.update(read_tensor_file(shard_path))
        return tensors
    for filename in WEIGHT_FILES:
        if model_file(path, filename).is_file():
            return read_tensor_file(path / filename)
    raise CheckpointError(f"{path} has config.json but no weights ({', '.join(WEIGHT_FILES)} or {SHARD_INDEX})")
