"""Training engines: `scratch` (llmclf's own GPT-2/Llama code) and `hf` (transformers `Trainer`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

ENGINES = ("scratch", "hf")
SCRATCH_MODEL_TYPES = ("gpt2", "llama")


def choose_engine(model: str | os.PathLike) -> str:
    """`hf` for encoder models (the packaged `all-minilm-l6-v2`, a Hugging Face directory of
    another type than GPT-2/Llama, or any other name, taken as a hub id), else `scratch`."""
    from llmclf.config import GPT2_PRESETS
    from llmclf.engines.hf import PACKAGED_HF_MODELS
    from llmclf.loaders.llama import PACKAGED_GGUF

    spec = str(model)
    if spec in PACKAGED_HF_MODELS:
        return "hf"
    if spec in GPT2_PRESETS or spec in PACKAGED_GGUF:
        return "scratch"
    path = Path(spec)
    if path.is_dir():
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return "scratch"  # the scratch loader explains what is missing
        if config.get("format") == "llmclf":
            return config.get("engine", "scratch")
        return "scratch" if config.get("model_type") in SCRATCH_MODEL_TYPES else "hf"
    if path.exists() or path.suffix:
        return "scratch"  # a weights file (the scratch loader reports a missing one)
    return "hf"  # a hub id, such as "bert-base-uncased"
