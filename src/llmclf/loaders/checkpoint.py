"""llmclf's own checkpoint directory: `model.safetensors` + `config.json` (+ tokenizer files)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from llmclf.errors import CheckpointError
from llmclf.families import family, family_of
from llmclf.loaders.paths import model_file
from llmclf.loaders.tensors import atomic_save_safetensors, atomic_write_json, read_tensor_file
from llmclf.tokenizer import Tokenizer

CHECKPOINT_FORMAT = "llmclf"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def is_llmclf_checkpoint(path: str | os.PathLike) -> bool:
    return read_checkpoint_config(path, required=False) is not None


def read_checkpoint_config(path: str | os.PathLike, required: bool = True) -> dict[str, Any] | None:
    """The `config.json` of an llmclf checkpoint directory (None, or an error if `required`)."""
    config_path = model_file(path, CONFIG_FILE)
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        if required:
            raise CheckpointError(f"{config_path} is missing or not valid JSON: {exc}") from exc
        return None
    if not isinstance(config, dict) or config.get("format") != CHECKPOINT_FORMAT:
        if required:
            raise CheckpointError(f"{config_path} is not an llmclf checkpoint config")
        return None
    return config


def save_checkpoint(out_dir: str | os.PathLike, model: torch.nn.Module, tokenizer: Tokenizer | None = None,
                    **extra: Any) -> Path:
    """Write the model's weights and config (plus tokenizer files, when local) to `out_dir`.

    Every file is written to a temporary name and renamed, config.json last, so a reader
    never sees a half-written checkpoint. `extra` goes into config.json as is.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    tied = model.out_head.weight is model.tok_emb.weight
    if tied:  # safetensors stores no shared tensors; loading ties them again
        state.pop("out_head.weight")
    atomic_save_safetensors(state, out_dir / WEIGHTS_FILE, metadata={"format": "pt"})
    tokenizer_info = tokenizer.save(out_dir) if tokenizer is not None else None
    config = {
        "format": CHECKPOINT_FORMAT,
        "format_version": 1,
        "architecture": family_of(model).name,
        "model": model.cfg.to_dict(),
        "out_features": model.out_head.out_features,
        "out_bias": model.out_head.bias is not None,
        "tied_out_head": tied,
        "tokenizer": tokenizer_info,
        **extra,
    }
    atomic_write_json(out_dir / CONFIG_FILE, config)
    return out_dir


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, state dict) of an llmclf checkpoint directory; a tied head is tied again."""
    config = read_checkpoint_config(path)
    if config.get("engine") == "hf":
        raise CheckpointError(f"{path} holds a classifier trained by the Transformers engine; "
                              "load it with llmclf.load_classifier (or the evaluate/predict/serve commands)")
    family(str(config.get("architecture")))  # a clear error for an unregistered one
    state = read_tensor_file(model_file(path, WEIGHTS_FILE))
    if config.get("tied_out_head") and "tok_emb.weight" in state:
        state["out_head.weight"] = state["tok_emb.weight"]
    return config, state
