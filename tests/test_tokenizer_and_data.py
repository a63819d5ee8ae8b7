"""GPT-2 tokenizer from local files, and the book's sliding-window language-model data."""

from __future__ import annotations

import shutil

import pytest
import torch

from llmclf.data.lm import GPTDatasetV1, create_dataloader_v1, read_text, split_text
from llmclf.errors import DataError, TokenizerError
from llmclf.tokenizer import TOKENIZER_DIR_ENV, load_gpt2_tokenizer, text_to_token_ids, token_ids_to_text


def test_golden_token_ids(tokenizer):
    assert tokenizer.encode("Hello, world") == [15496, 11, 995]
    assert tokenizer.encode("Every effort moves you") == [6109, 3626, 6100, 345]
    assert tokenizer.encode("<|endoftext|>") == [50256]
    assert tokenizer.eos_id == tokenizer.pad_id == 50256
    ids = text_to_token_ids("Hello, world", tokenizer)
    assert ids.shape == (1, 3)
    assert token_ids_to_text(ids, tokenizer) == "Hello, world"


def test_hugging_face_file_names_and_env_var(tmp_path, gpt2_tokenizer_dir, monkeypatch):
    shutil.copy(gpt2_tokenizer_dir / "encoder.json", tmp_path / "vocab.json")
    shutil.copy(gpt2_tokenizer_dir / "vocab.bpe", tmp_path / "merges.txt")
    assert load_gpt2_tokenizer(model_dir=tmp_path).encode("Hello, world") == [15496, 11, 995]
    monkeypatch.setenv(TOKENIZER_DIR_ENV, str(gpt2_tokenizer_dir))
    assert load_gpt2_tokenizer().source == str(gpt2_tokenizer_dir)


def test_missing_tokenizer_files_say_how_to_provide_them(tmp_path, monkeypatch):
    with pytest.raises(TokenizerError, match="neither encoder.json"):
        load_gpt2_tokenizer(tokenizer_dir=tmp_path)
    # Offline and nothing local: the error names both ways to provide the files.
    monkeypatch.delenv(TOKENIZER_DIR_ENV, raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(TokenizerError, match=f"--tokenizer-dir DIR or set {TOKENIZER_DIR_ENV}"):
        load_gpt2_tokenizer()


def test_windows_match_the_books_dataset(tokenizer, verdict_text):
    book_ch02 = pytest.importorskip("llms_from_scratch.ch02")
    ours = GPTDatasetV1(verdict_text, tokenizer, max_length=64, stride=48)
    book = book_ch02.GPTDatasetV1(verdict_text, tokenizer.encoding, max_length=64, stride=48)
    assert len(ours) == len(book) > 0
    for i in (0, 5, len(book) - 1):
        assert torch.equal(ours[i][0], book[i][0]) and torch.equal(ours[i][1], book[i][1])


def test_split_is_by_characters():
    train, val = split_text("abcdefghij", 0.9)
    assert (train, val) == ("abcdefghi", "j")
    with pytest.raises(DataError):
        split_text("abc", 1.5)


def test_too_short_text_is_a_clear_error(tokenizer):
    with pytest.raises(DataError, match=r"has 3 tokens: 0 window\(s\) of 257 tokens"):
        create_dataloader_v1("Hello, world", tokenizer, batch_size=2, max_length=256, stride=256)


def test_empty_or_missing_text_file(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        read_text(tmp_path / "empty.txt")
    with pytest.raises(DataError, match="not found"):
        read_text(tmp_path / "missing.txt")
