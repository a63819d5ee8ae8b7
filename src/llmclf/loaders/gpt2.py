"""GPT-2 checkpoints in Hugging Face format -> `GPTModel` state dicts (and the download of them)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from llmclf.config import GPTConfig
from llmclf.errors import CheckpointError
from llmclf.loaders.tensors import read_tensor_file

# Hugging Face repositories with OpenAI's released weights, per preset.
HF_REPOS = {
    "gpt2-small": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}

# ours <- Hugging Face, per block ("{}" is the block index). Conv1D weights are stored (in, out).
_BLOCK_MAP = {
    "trf_blocks.{}.norm1.scale": "h.{}.ln_1.weight",
    "trf_blocks.{}.norm1.shift": "h.{}.ln_1.bias",
    "trf_blocks.{}.att.out_proj.weight": "h.{}.attn.c_proj.weight",
    "trf_blocks.{}.att.out_proj.bias": "h.{}.attn.c_proj.bias",
    "trf_blocks.{}.norm2.scale": "h.{}.ln_2.weight",
    "trf_blocks.{}.norm2.shift": "h.{}.ln_2.bias",
    "trf_blocks.{}.ff.layers.0.weight": "h.{}.mlp.c_fc.weight",
    "trf_blocks.{}.ff.layers.0.bias": "h.{}.mlp.c_fc.bias",
    "trf_blocks.{}.ff.layers.2.weight": "h.{}.mlp.c_proj.weight",
    "trf_blocks.{}.ff.layers.2.bias": "h.{}.mlp.c_proj.bias",
}
_TOP_MAP = {
    "tok_emb.weight": "wte.weight",
    "pos_emb.weight": "wpe.weight",
    "final_norm.scale": "ln_f.weight",
    "final_norm.shift": "ln_f.bias",
}


def is_hf_gpt2_dir(path: str | os.PathLike) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "gpt2"
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def config_from_hf(hf_config: dict, name: str = "custom") -> GPTConfig:
    """`GPTConfig` from a Hugging Face GPT-2 `config.json` (dropout set to 0 for inference)."""
    try:
        return GPTConfig(
            vocab_size=hf_config["vocab_size"],
            context_length=hf_config.get("n_positions", hf_config.get("n_ctx", 1024)),
            emb_dim=hf_config["n_embd"],
            n_heads=hf_config["n_head"],
            n_layers=hf_config["n_layer"],
            drop_rate=0.0,
            qkv_bias=True,
            name=name,
        )
    except KeyError as exc:
        raise CheckpointError(f"GPT-2 config.json lacks the key {exc}") from exc


def gpt2_state_dict_from_hf(hf_state: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Rename and reshape a Hugging Face GPT-2 state dict into `GPTModel`'s names.

    Accepts `GPT2LMHeadModel` (`transformer.` prefix) and `GPT2Model` keys; splits the fused
    `c_attn` projection into W_query/W_key/W_value and transposes Conv1D weights. The output
    head is tied to the token embedding unless the checkpoint has its own `lm_head.weight`.
    """
    hf = {k.removeprefix("transformer."): v for k, v in hf_state.items()}
    hf = {k: v for k, v in hf.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # buffers

    def take(key: str) -> torch.Tensor:
        if key not in hf:
            raise CheckpointError(f"GPT-2 checkpoint lacks the tensor {key!r}")
        return hf.pop(key)

    ours = {name: take(hf_name) for name, hf_name in _TOP_MAP.items()}
    for i in range(cfg.n_layers):
        for name, hf_name in _BLOCK_MAP.items():
            tensor = take(hf_name.format(i))
            ours[name.format(i)] = tensor.T if tensor.ndim == 2 else tensor
        qkv_w = take(f"h.{i}.attn.c_attn.weight").T  # (3 * C, C)
        qkv_b = take(f"h.{i}.attn.c_attn.bias")
        for part, w, b in zip(("W_query", "W_key", "W_value"), qkv_w.chunk(3), qkv_b.chunk(3), strict=True):
            ours[f"trf_blocks.{i}.att.{part}.weight"] = w
            ours[f"trf_blocks.{i}.att.{part}.bias"] = b
    lm_head = hf.pop("lm_head.weight", None)
    ours["out_head.weight"] = lm_head if lm_head is not None else ours["tok_emb.weight"]
    if hf:
        raise CheckpointError(f"GPT-2 checkpoint has tensors this config does not use: {sorted(hf)[:5]}")
    return {k: v.contiguous() for k, v in ours.items()}


def read_hf_gpt2_dir(path: str | os.PathLike) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """Config and `GPTModel` state dict of a Hugging Face GPT-2 directory.

    Weights come from `model.safetensors`, else `pytorch_model.bin` (read with `weights_only=True`).
    """
    path = Path(path)
    cfg = config_from_hf(json.loads((path / "config.json").read_text()), name=path.name)
    for filename in ("model.safetensors", "pytorch_model.bin"):
        if (path / filename).is_file():
            return cfg, gpt2_state_dict_from_hf(read_tensor_file(path / filename), cfg)
    raise CheckpointError(f"{path} has config.json but neither model.safetensors nor pytorch_model.bin")


def download_gpt2(name: str) -> Path:
    """Download OpenAI's GPT-2 weights for preset `name` from the Hugging Face Hub (cached).

    Needs internet; respects `HF_HUB_OFFLINE` and reuses the local cache when it has the files.
    """
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(HF_REPOS[name], allow_patterns=[
            "config.json", "model.safetensors", "vocab.json", "merges.txt"]))
    except Exception as exc:  # hub and network errors come in many classes
        raise CheckpointError(
            f"could not download the pretrained {name} weights ({type(exc).__name__}: {exc}). "
            f"Without internet, pass --random-init for a randomly initialised {name}, "
            "or --model DIR with a local Hugging Face GPT-2 directory") from exc
