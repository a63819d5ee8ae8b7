"""Resolve a `--model` spec (preset name, directory or weights file) to a model and tokenizer."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from llmclf.config import GPT2_PRESETS, GPTConfig, LlamaConfig
from llmclf.errors import CheckpointError, ConfigError
from llmclf.loaders.checkpoint import is_llmclf_checkpoint, read_checkpoint
from llmclf.loaders.gpt2 import download_gpt2, is_hf_gpt2_dir, read_hf_gpt2_dir
from llmclf.loaders.llama import PACKAGED_GGUF, is_hf_llama_dir, packaged_gguf, read_gguf, read_hf_llama_dir
from llmclf.loaders.tensors import load_state_dict_checked, read_tensor_file
from llmclf.models.gpt2 import GPTModel
from llmclf.models.llama import LlamaModel
from llmclf.tokenizer import HFTokenizer, Tokenizer, load_gpt2_tokenizer

DEFAULT_SEED = 123  # the book's seed: `torch.manual_seed(123)` before building the model


def load_model(
    spec: str | os.PathLike,
    *,
    random_init: bool = False,
    seed: int | None = None,
    base_config: str | None = None,
    context_length: int | None = None,
    drop_rate: float | None = None,
    qkv_bias: bool | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
) -> tuple[GPTModel | LlamaModel, Tokenizer]:
    """Build the model `spec` names and its tokenizer; the model is in eval mode, on the CPU.

    Args:
        spec: a preset (`gpt2-small` ... `gpt2-xl`: pretrained weights are downloaded unless
            `random_init`), a packaged model (`smollm2-135m`), a `.gguf` file (llama), a Hugging
            Face GPT-2 or Llama directory, an llmclf checkpoint directory, or a state_dict file
            (`.pth`/`.pt`/`.bin`/`.safetensors`, e.g. saved by the book's code) with `base_config`.
        random_init: with a preset, initialise randomly after `torch.manual_seed(seed)`.
        seed: seed for `random_init` (default 123, the book's).
        base_config: for a state_dict file, a preset name or a JSON file of the book's config dict.
        context_length, drop_rate, qkv_bias: override the configuration (a pretrained position
            embedding is cut to a shorter context length).
        tokenizer_dir: directory with GPT-2 tokenizer files (see `load_gpt2_tokenizer`).
    """
    overrides = {"context_length": context_length, "drop_rate": drop_rate, "qkv_bias": qkv_bias}
    spec_str = str(spec)
    path = Path(spec)
    out_bias = False
    tokenizer = None

    if spec_str in GPT2_PRESETS:
        if random_init:
            cfg = GPTConfig.from_name(spec_str, **overrides)
            torch.manual_seed(DEFAULT_SEED if seed is None else seed)
            return GPTModel(cfg).eval(), load_gpt2_tokenizer(tokenizer_dir)
        model_dir = download_gpt2(spec_str)
        base, state = read_hf_gpt2_dir(model_dir)
        base = dataclasses.replace(base, name=spec_str)
        tokenizer = load_gpt2_tokenizer(tokenizer_dir, model_dir=model_dir)
    elif spec_str in PACKAGED_GGUF or (path.is_file() and path.suffix == ".gguf"):
        gguf_path = packaged_gguf(spec_str) if spec_str in PACKAGED_GGUF else path
        base, state = read_gguf(gguf_path)
        tokenizer = HFTokenizer.from_gguf(gguf_path)
    elif path.is_dir():
        if is_llmclf_checkpoint(path):
            saved, state = read_checkpoint(path)
            config_class = LlamaConfig if saved["architecture"] == "llama" else GPTConfig
            base = config_class.from_dict(saved["model"])
            out_bias = saved.get("out_bias", False)
            info = saved.get("tokenizer") or {}
            if info.get("kind") == "hf":
                tokenizer = HFTokenizer.from_dir(path, info.get("eos_id"), info.get("pad_id"))
        elif is_hf_gpt2_dir(path):
            base, state = read_hf_gpt2_dir(path)
        elif is_hf_llama_dir(path):
            base, state = read_hf_llama_dir(path)
            tokenizer = HFTokenizer.from_dir(path)
        else:
            raise CheckpointError(
                f"{path} is not an llmclf checkpoint, nor a Hugging Face GPT-2 or Llama directory "
                "(expected config.json with format 'llmclf' or model_type 'gpt2' / 'llama')")
        if tokenizer is None:
            tokenizer = load_gpt2_tokenizer(tokenizer_dir, model_dir=path)
    elif path.is_file():
        if base_config is None:
            raise ConfigError(
                f"{path} is a bare state_dict; say which architecture it fits with --base-config "
                f"(one of {', '.join(GPT2_PRESETS)}, or a JSON file of the config dict)")
        base = config_from_spec(base_config)
        state = read_tensor_file(path)
        out_bias = "out_head.bias" in state
        tokenizer = load_gpt2_tokenizer(tokenizer_dir)
    else:
        raise ConfigError(
            f"unknown model {spec_str!r}: not a preset ({', '.join([*GPT2_PRESETS, *PACKAGED_GGUF])}), "
            "nor an existing directory, GGUF or weights file")

    if random_init:
        raise ConfigError("--random-init applies to GPT-2 preset names only, not to checkpoints")
    if isinstance(base, LlamaConfig) and qkv_bias is not None:
        raise ConfigError("--qkv-bias/--no-qkv-bias apply to GPT-2 models only")
    cfg = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
    model = _model_for_state(cfg, state, out_bias, source=spec_str)
    return model.eval(), tokenizer


def config_from_spec(base_config: str) -> GPTConfig:
    """A preset name, or a JSON file holding the book's config dict."""
    if base_config in GPT2_PRESETS:
        return GPTConfig.from_name(base_config)
    path = Path(base_config)
    if not path.is_file():
        raise ConfigError(f"unknown base config {base_config!r}; valid names: {', '.join(GPT2_PRESETS)}, "
                          "or the path of a JSON config file")
    try:
        values: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not a JSON config: {exc}") from exc
    return GPTConfig.from_dict(values)


def _model_for_state(cfg: GPTConfig | LlamaConfig, state: dict[str, torch.Tensor], out_bias: bool,
                     source: str) -> GPTModel | LlamaModel:
    pos = state.get("pos_emb.weight")
    if pos is not None and pos.shape[0] > cfg.context_length:
        state = {**state, "pos_emb.weight": pos[: cfg.context_length]}  # shorter context: first positions
    model = LlamaModel(cfg) if isinstance(cfg, LlamaConfig) else GPTModel(cfg)
    head = state.get("out_head.weight")
    if head is not None and head.shape[0] != cfg.vocab_size:
        # A classifier checkpoint (the book's chapter 6): its head maps to the classes.
        model.out_head = nn.Linear(cfg.emb_dim, head.shape[0], bias=out_bias)
    load_state_dict_checked(model, state, source)
    return model
