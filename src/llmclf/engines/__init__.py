"""Training engines: `scratch` (llmclf's own models, one per registered family) and `hf` (transformers `Trainer`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

ENGINES = ("scratch", "hf")


def choose_engine(model: str | os.PathLike) -> str:
    """`scratch` for the registered families (their presets, packaged models, GGUF files and Hugging
    Face directories, see `llmclf.families`), `hf` for anything else (encoders such as the packaged
    `all-minilm-l6-v2`, other Hugging Face directories, other names taken as hub ids)."""
    from llmclf.families import is_scratch_hf_type, scratch_model_names
    from llmclf.loaders.encoders import PACKAGED_HF_MODELS

    spec = str(model)
    if spec in PACKAGED_HF_MODELS:
        return "hf"
    if spec in scratch_model_names():
        return "scratch"
    path = Path(spec)
    if path.is_dir():
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return "scratch"  # the scratch loader explains what is missing
        if config.get("format") == "llmclf":
            return config.get("engine", "scratch")
        return "scratch" if is_scratch_hf_type(config.get("model_type")) else "hf"
    if path.exists() or path.suffix:
        return "scratch"  # a weights file (the scratch loader reports a missing one)
    return "hf"  # a hub id, such as "bert-base-uncased"
