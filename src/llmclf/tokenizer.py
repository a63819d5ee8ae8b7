"""Tokenizers: GPT-2 BPE through tiktoken, built offline from local files when they exist."""

from __future__ import annotations

import os
from pathlib import Path

import tiktoken
import torch

from llmclf.errors import TokenizerError

TOKENIZER_DIR_ENV = "LLMCLF_GPT2_TOKENIZER_DIR"
ENDOFTEXT = "<|endoftext|>"

# OpenAI's file names, then the names a Hugging Face GPT-2 directory uses for the same files.
_FILE_PAIRS = (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt"))


class GPT2Tokenizer:
    """GPT-2 byte-level BPE (tiktoken). `<|endoftext|>` (id 50256) is allowed in text."""

    def __init__(self, encoding: tiktoken.Encoding, source: str) -> None:
        self.encoding = encoding
        self.source = source
        self.eos_id: int = encoding.eot_token
        self.pad_id: int = encoding.eot_token  # GPT-2 has no pad token; the book pads with 50256
        self.bos_id: int | None = None  # GPT-2 starts texts with no special token

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode(text, allowed_special={ENDOFTEXT})

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.encoding.encode_batch(texts, allowed_special={ENDOFTEXT})

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)

    def save(self, directory: str | os.PathLike) -> dict:
        """Copy the BPE files into `directory` (when they are local); returns config info."""
        import shutil

        from llmclf.loaders.tensors import atomic_path

        source = Path(self.source)
        files = find_gpt2_tokenizer_files(source) if source.is_dir() else None
        if files and source.resolve() != Path(directory).resolve():
            for src, name in zip(files, ("encoder.json", "vocab.bpe"), strict=True):
                with atomic_path(Path(directory) / name) as tmp:
                    shutil.copyfile(src, tmp)
        return {"kind": "gpt2-bpe"}

    def __repr__(self) -> str:
        return f"GPT2Tokenizer(source={self.source!r})"


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer (Llama, Qwen3, Gemma 3 ...). The only special token
    it adds is `bos_id` at the start of every text, for families that expect one (Gemma). A special
    token's string inside a text (`<|im_end|>`, `<end_of_turn>`) is read as that token, as in
    `transformers` (the chat templates rely on it)."""

    TOKENIZER_FILE = "tokenizer.json"

    def __init__(self, backend, eos_id: int, pad_id: int | None, source: str, bos_id: int | None = None) -> None:
        self.backend = backend  # tokenizers.Tokenizer
        self.eos_id = eos_id
        self.pad_id = eos_id if pad_id is None else pad_id
        self.bos_id = bos_id
        self.source = source
        self._prefix = [] if bos_id is None else [bos_id]

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._prefix + self.backend.encode(_unicode(text), add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        texts = [_unicode(text) for text in texts]
        return [self._prefix + e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False)

    def save(self, directory: str | os.PathLike) -> dict:
        from llmclf.loaders.tensors import atomic_path

        with atomic_path(Path(directory) / self.TOKENIZER_FILE) as tmp:
            self.backend.save(str(tmp))
        return {"kind": "hf", "eos_id": self.eos_id, "pad_id": self.pad_id, "bos_id": self.bos_id}

    @classmethod
    def from_gguf(cls, path: str | os.PathLike, add_bos: bool = False) -> HFTokenizer:
        """Built from the vocabulary and merges in a GGUF file's metadata (via transformers).

        Calls the GGUF tokenizer conversion that `AutoTokenizer.from_pretrained(gguf_file=...)`
        uses, without the model-config parse that comes with it (10 s for SmolLM2 on 2 cores).
        BOS starts every text when the file's `tokenizer.ggml.add_bos_token` says so, else when
        `add_bos` (the family's rule) does.
        """
        from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

        path = Path(path)
        try:
            architecture, tokenizer_dict, config = get_gguf_tokenizer(str(path))
            backend, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
        except Exception as exc:  # transformers raises many kinds for unusable metadata
            raise TokenizerError(f"cannot build a tokenizer from {path}: {type(exc).__name__}: {exc}") from exc
        eos_id = backend.token_to_id(config["eos_token"]) if config.get("eos_token") else None
        if eos_id is None:
            raise TokenizerError(f"{path}: the GGUF metadata names no end-of-text token (tokenizer.ggml.eos_token_id)")
        pad_id = backend.token_to_id(config["pad_token"]) if config.get("pad_token") else None
        bos_id = backend.token_to_id(config["bos_token"]) if config.get("bos_token") else None
        if not config.get("add_bos_token", add_bos):
            bos_id = None
        return cls(backend, eos_id, pad_id, str(path), bos_id)

    @classmethod
    def from_dir(cls, directory: str | os.PathLike, eos_id: int | None = None, pad_id: int | None = None,
                 bos_id: int | None = None, add_bos: bool = False) -> HFTokenizer:
        """From `tokenizer.json`; ids of eos/pad/bos from the arguments (an llmclf checkpoint's
        config) or from `tokenizer_config.json`, whose `add_bos_token` decides BOS (without it: whether
        tokenizer.json's post-processor adds BOS, else `add_bos`, the family's rule)."""
        import json

        from tokenizers import Tokenizer

        from llmclf.loaders.paths import model_file

        directory = Path(directory)
        file = model_file(directory, cls.TOKENIZER_FILE)
        if not file.is_file():
            raise TokenizerError(f"{directory} has no {cls.TOKENIZER_FILE}")
        backend = Tokenizer.from_file(str(file))
        if eos_id is None:
            config_file = model_file(directory, "tokenizer_config.json")
            config = json.loads(config_file.read_text()) if config_file.is_file() else {}

            def token_id(key: str) -> int | None:
                token = config.get(key)
                token = token.get("content") if isinstance(token, dict) else token
                return backend.token_to_id(token) if token else None

            eos_id, pad_id = token_id("eos_token"), pad_id if pad_id is not None else token_id("pad_token")
            if eos_id is None:
                raise TokenizerError(f"{directory}: no eos_token in tokenizer_config.json")
            bos_id = token_id("bos_token")
            if bos_id is not None and "add_bos_token" not in config:  # e.g. Llama 3: its post-processor says
                add_bos = backend.encode("a", add_special_tokens=True).ids[:1] == [bos_id]
            bos_id = bos_id if config.get("add_bos_token", add_bos) else None
        return cls(backend, eos_id, pad_id, str(directory), bos_id)

    def __repr__(self) -> str:
        return f"HFTokenizer(source={self.source!r})"


Tokenizer = GPT2Tokenizer | HFTokenizer


def _unicode(text: str) -> str:
    """`text` with each lone surrogate (e.g. from a JSON "\\ud800", no Unicode) replaced by U+FFFD and
    split surrogate pairs joined, as tiktoken does: `tokenizers` refuses such a str outright."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def find_gpt2_tokenizer_files(directory: str | os.PathLike) -> tuple[Path, Path] | None:
    """(vocabulary json, merges) in `directory` under either naming, or None."""
    directory = Path(directory)
    for vocab_name, merges_name in _FILE_PAIRS:
        vocab, merges = directory / vocab_name, directory / merges_name
        if vocab.is_file() and merges.is_file():
            return vocab, merges
    return None


def load_gpt2_tokenizer(tokenizer_dir: str | os.PathLike | None = None,
                        model_dir: str | os.PathLike | None = None) -> GPT2Tokenizer:
    """GPT-2 tokenizer from the first place that has its files.

    Looks in `tokenizer_dir`, then `model_dir`, then `$LLMCLF_GPT2_TOKENIZER_DIR`; if none has
    `encoder.json` + `vocab.bpe` (or `vocab.json` + `merges.txt`), tiktoken's own `gpt2`
    encoding is used, which downloads the files once (needs internet) and caches them.
    """
    if tokenizer_dir is not None and find_gpt2_tokenizer_files(tokenizer_dir) is None:
        raise TokenizerError(
            f"tokenizer directory {str(tokenizer_dir)!r} has neither encoder.json + vocab.bpe "
            "nor vocab.json + merges.txt")
    from llmclf.loaders.paths import model_file

    env_dir = os.environ.get(TOKENIZER_DIR_ENV)
    for directory in (tokenizer_dir, model_dir, env_dir):
        if directory and (files := find_gpt2_tokenizer_files(directory)):
            if directory is model_dir:  # a downloaded model's files must not link outside it
                files = tuple(model_file(model_dir, file.name) for file in files)
            return GPT2Tokenizer(_encoding_from_files(*files), source=str(directory))
    try:
        return GPT2Tokenizer(tiktoken.get_encoding("gpt2"), source="tiktoken")
    except Exception as exc:  # tiktoken raises network errors of several libraries
        raise TokenizerError(
            "the GPT-2 tokenizer files could not be found or downloaded "
            f"({type(exc).__name__}). Put encoder.json and vocab.bpe (or vocab.json and "
            f"merges.txt) in a directory and pass --tokenizer-dir DIR or set {TOKENIZER_DIR_ENV}=DIR"
        ) from exc


def _encoding_from_files(vocab: Path, merges: Path) -> tiktoken.Encoding:
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    try:
        ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(merges), encoder_json_file=str(vocab))
    except (ValueError, KeyError, AssertionError) as exc:
        raise TokenizerError(f"{vocab} / {merges} are not GPT-2 BPE tokenizer files: {exc}") from exc
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: len(ranks)}, explicit_n_vocab=len(ranks) + 1)


def text_to_token_ids(text: str, tokenizer: Tokenizer) -> torch.Tensor:
    """Token ids of `text` as a (1, T) tensor (the book's helper)."""
    return torch.tensor(tokenizer.encode(text)).unsqueeze(0)


def token_ids_to_text(token_ids: torch.Tensor, tokenizer: Tokenizer) -> str:
    """Text of a (1, T) or (T,) tensor of token ids (the book's helper)."""
    return tokenizer.decode(token_ids.squeeze(0).tolist())
