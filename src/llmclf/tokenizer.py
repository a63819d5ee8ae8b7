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

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode(text, allowed_special={ENDOFTEXT})

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.encoding.encode_batch(texts, allowed_special={ENDOFTEXT})

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)

    def __repr__(self) -> str:
        return f"GPT2Tokenizer(source={self.source!r})"


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
    env_dir = os.environ.get(TOKENIZER_DIR_ENV)
    for directory in (tokenizer_dir, model_dir, env_dir):
        if directory and (files := find_gpt2_tokenizer_files(directory)):
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


def text_to_token_ids(text: str, tokenizer: GPT2Tokenizer) -> torch.Tensor:
    """Token ids of `text` as a (1, T) tensor (the book's helper)."""
    return torch.tensor(tokenizer.encode(text)).unsqueeze(0)


def token_ids_to_text(token_ids: torch.Tensor, tokenizer: GPT2Tokenizer) -> str:
    """Text of a (1, T) or (T,) tensor of token ids (the book's helper)."""
    return tokenizer.decode(token_ids.squeeze(0).tolist())
