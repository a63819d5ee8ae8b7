"""Resolve a `--model` spec (preset name, packaged model, directory or weights file) to a model and tokenizer."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from llmclf.errors import CheckpointError, ConfigError
from llmclf.families import FAMILIES, Family, family, packaged, preset, scratch_model_names
from llmclf.loaders.checkpoint import is_llmclf_checkpoint, read_checkpoint
from llmclf.loaders.gguf import open_gguf, read_gguf
from llmclf.loaders.hf_dir import read_hf_dir
from llmclf.loaders.paths import model_file
from llmclf.loaders.tensors import check_state_fits, load_state_dict_checked, read_tensor_file
from llmclf.models.decoder import DecoderModel
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
) -> tuple[DecoderModel, Tokenizer]:
    """Build the model `spec` names and its tokenizer; the model is in eval mode, on the CPU.

    Args:
        spec: a preset (`gpt2-small` ... `gpt2-xl`: pretrained weights are downloaded unless
            `random_init`), a packaged model (`smollm2-135m`, `gemma3-270m`), a `.gguf` file, a
            Hugging Face directory of a registered family (GPT-2, Llama, Qwen3/Qwen2, Gemma 3), an
            llmclf checkpoint directory, or a state_dict file (`.pth`/`.pt`/`.bin`/`.safetensors`,
            e.g. saved by the book's code) with `base_config`.
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

    if found := preset(spec_str):
        fam, values = found
        if random_init:
            cfg = _override(fam, fam.config_cls(name=spec_str, **values), overrides)
            torch.manual_seed(DEFAULT_SEED if seed is None else seed)
            return fam.build(cfg).eval(), _tokenizer(fam, None, tokenizer_dir)
        from llmclf.loaders.download import download_weights

        model_dir = download_weights(spec_str, fam.hf_repos[spec_str])
        fam, base, state = read_hf_dir(model_dir)
        base = dataclasses.replace(base, name=spec_str)
        tokenizer = _tokenizer(fam, model_dir, tokenizer_dir)
    elif (found := packaged(spec_str)) or (path.is_file() and path.suffix == ".gguf"):
        gguf_path = found[1].path() if found else path
        fam, base, state = read_gguf(gguf_path)
        tokenizer = HFTokenizer.from_gguf(gguf_path, add_bos=fam.add_bos)
    elif path.is_dir():
        if is_llmclf_checkpoint(path):
            saved, state = read_checkpoint(path)
            fam = family(saved["architecture"])
            try:
                base = fam.config_from_dict(saved.get("model"))
            except ConfigError as exc:
                raise CheckpointError(f"{path}/config.json: \"model\" is not a valid {fam.name} config: {exc}") from exc
            out_bias = saved.get("out_bias", False)
            info = saved.get("tokenizer") if isinstance(saved.get("tokenizer"), dict) else {}
            if info.get("kind") == "hf":
                tokenizer = HFTokenizer.from_dir(path, info.get("eos_id"), info.get("pad_id"), info.get("bos_id"))
        elif (path / "config.json").is_file():
            fam, base, state = read_hf_dir(path)
        else:
            raise CheckpointError(f"{path} has no config.json: it is neither an llmclf checkpoint nor a Hugging "
                                  f"Face model directory (registered families: {', '.join(FAMILIES)})")
        tokenizer = tokenizer or _tokenizer(fam, path, tokenizer_dir)
    elif path.is_file():
        if base_config is None:
            raise ConfigError(
                f"{path} is a bare state_dict; say which architecture it fits with --base-config "
                f"(one of {', '.join(FAMILIES['gpt2'].presets)}, or a JSON file of the config dict)")
        fam, base = FAMILIES["gpt2"], config_from_spec(base_config)
        state = read_tensor_file(path)
        out_bias = "out_head.bias" in state
        tokenizer = load_gpt2_tokenizer(tokenizer_dir)
    else:
        raise ConfigError(
            f"unknown model {spec_str!r}: not a preset or packaged model ({', '.join(scratch_model_names())}), "
            "nor an existing directory, GGUF or weights file")

    if random_init:
        raise ConfigError("--random-init applies to preset names only, not to checkpoints")
    model = _model_for_state(fam, _override(fam, base, overrides), state, out_bias, source=spec_str)
    return model.eval(), tokenizer


def _tokenizer(fam: Family, model_dir: Path | None, tokenizer_dir: str | os.PathLike | None) -> Tokenizer:
    """The family's tokenizer: GPT-2's BPE files, or the directory's tokenizer.json."""
    if fam.tokenizer == "gpt2-bpe":
        return load_gpt2_tokenizer(tokenizer_dir, model_dir=model_dir)
    if model_dir is None:
        raise ConfigError(f"{fam.name} models need their own tokenizer files; load a directory or GGUF file")
    return HFTokenizer.from_dir(model_dir, add_bos=fam.add_bos)


def _override(fam: Family, cfg: Any, overrides: dict[str, Any]) -> Any:
    given = {k: v for k, v in overrides.items() if v is not None}
    fields = {f.name for f in dataclasses.fields(cfg)}
    foreign = [k for k in given if k not in fields]
    if foreign:
        raise ConfigError(f"{', '.join('--' + k.replace('_', '-') for k in foreign)} do(es) not apply to "
                          f"{fam.name} models")
    return dataclasses.replace(cfg, **given)


def config_from_spec(base_config: str) -> Any:
    """A GPT-2 preset name, or a JSON file holding the book's config dict."""
    gpt2 = FAMILIES["gpt2"]
    if base_config in gpt2.presets:
        return gpt2.config_cls.from_name(base_config)
    path = Path(base_config)
    if not path.is_file():
        raise ConfigError(f"unknown base config {base_config!r}; valid names: {', '.join(gpt2.presets)}, "
                          "or the path of a JSON config file")
    try:
        values: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not a JSON config: {exc}") from exc
    return gpt2.config_from_dict(values)


# Tables a model computes rather than loads (rotary cos/sin: context_length x head_dim each) may exceed
# its weights by this much; beyond it, a config.json asks for more memory than its weights justify.
BUFFER_ALLOWANCE = 256 << 20


def _model_for_state(fam: Family, cfg: Any, state: dict[str, torch.Tensor], out_bias: bool,
                     source: str) -> DecoderModel:
    """The model of `cfg` holding `state`. It is first built on the meta device (shapes, no memory)
    and checked against the weights, so a config.json asking for far more than its weights hold
    (`vocab_size: 1e12`) is refused before anything is allocated."""
    pos = state.get("pos_emb.weight")
    if pos is not None and pos.shape[0] > cfg.context_length:
        state = {**state, "pos_emb.weight": pos[: cfg.context_length]}  # shorter context: first positions
    with torch.device("meta"):
        skeleton = _with_head(fam.build(cfg), cfg, state, out_bias)
    check_state_fits(skeleton, state, source)
    weights = sum(p.numel() * p.element_size() for p in skeleton.parameters())
    tables = sum(b.numel() * b.element_size() for b in skeleton.buffers())
    if tables > weights + BUFFER_ALLOWANCE:
        raise CheckpointError(
            f"{source}: its configuration (context_length {cfg.context_length:,}) needs {tables / 2**20:,.0f} MiB "
            f"of position tables for {weights / 2**20:,.0f} MiB of weights; refusing it as corrupt "
            "(pass a smaller --context-length if the file is right)")
    model = _with_head(fam.build(cfg), cfg, state, out_bias)
    load_state_dict_checked(model, state, source)
    return model


def _with_head(model: DecoderModel, cfg: Any, state: dict[str, torch.Tensor], out_bias: bool) -> DecoderModel:
    head = state.get("out_head.weight")
    if head is not None and head.shape[0] != cfg.vocab_size:
        # A classifier checkpoint (the book's chapter 6): its head maps to the classes.
        model.out_head = nn.Linear(cfg.emb_dim, head.shape[0], bias=out_bias)
    return model


def chat_template_for(spec: str) -> str | None:
    """One user turn of the chat format of the model `spec` names ("{prompt}" = the message): a
    packaged model's, else its family's (for a GGUF file, a Hugging Face or llmclf directory); None
    when there is none (GPT-2, encoders)."""
    if found := packaged(spec):
        return found[1].chat_template or found[0].chat_template
    fam = None
    path = Path(spec)
    if path.suffix == ".gguf" and path.is_file():
        arch = open_gguf(path).arch
        fam = next((f for f in FAMILIES.values() if arch in f.gguf_architectures), None)
    elif (path / "config.json").is_file():
        try:
            config = json.loads(model_file(path, "config.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        if not isinstance(config, dict):
            return None
        if config.get("format") == "llmclf":  # a model trained from a packaged one keeps its chat format
            backbone = str(config.get("backbone", ""))
            if packaged(backbone):
                return chat_template_for(backbone)
            fam = FAMILIES.get(config.get("architecture"))
        else:
            fam = next((f for f in FAMILIES.values() if config.get("model_type") in f.hf_model_types), None)
    return fam.chat_template if fam is not None else None
