"""Downloading a preset's pretrained weights (e.g. OpenAI's GPT-2) from the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

from llmclf.errors import CheckpointError


def download_weights(name: str, repo: str) -> Path:
    """Download the weights of preset `name` from the Hugging Face Hub repository `repo` (cached).

    Needs internet; respects `HF_HUB_OFFLINE` and reuses the local cache when it has the files.
    """
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=[
            "config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer*.json", "vocab.json",
            "merges.txt"]))
    except Exception as exc:  # hub and network errors come in many classes
        raise CheckpointError(
            f"could not download the pretrained {name} weights ({type(exc).__name__}: {exc}). "
            f"Without internet, pass --random-init for a randomly initialised {name}, "
            "or --model DIR with a local Hugging Face model directory") from exc
