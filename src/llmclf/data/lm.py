"""Language-model data: a text cut into sliding windows of next-token (input, target) pairs."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from llmclf.errors import DataError
from llmclf.tokenizer import GPT2Tokenizer


class GPTDatasetV1(Dataset):
    """The book's sliding-window dataset: window i is tokens [i*stride, i*stride + max_length)."""

    def __init__(self, txt: str, tokenizer: GPT2Tokenizer, max_length: int, stride: int) -> None:
        if max_length < 1 or stride < 1:
            raise DataError(f"max_length and stride must be >= 1, got {max_length} and {stride}")
        token_ids = torch.tensor(tokenizer.encode(txt), dtype=torch.long)
        self.num_tokens = len(token_ids)
        # Same windows as the book's `range(0, len(token_ids) - max_length, stride)` loop.
        starts = range(0, len(token_ids) - max_length, stride)
        self.input_ids = [token_ids[i : i + max_length] for i in starts]
        self.target_ids = [token_ids[i + 1 : i + max_length + 1] for i in starts]

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.input_ids[idx], self.target_ids[idx]


def create_dataloader_v1(txt: str, tokenizer: GPT2Tokenizer, batch_size: int = 4, max_length: int = 256,
                         stride: int = 128, shuffle: bool = True, drop_last: bool = True,
                         num_workers: int = 0, name: str = "text",
                         generator: torch.Generator | None = None) -> DataLoader:
    """The book's `create_dataloader_v1`, with the tokenizer passed in.

    `generator` drives the shuffling (seed it for a reproducible order). Raises `DataError`
    when the text has too few tokens for one window (or one batch, with `drop_last`), naming
    `name` in the message.
    """
    dataset = GPTDatasetV1(txt, tokenizer, max_length, stride)
    needed = batch_size if drop_last else 1
    if len(dataset) < needed:
        raise DataError(
            f"{name} has {dataset.num_tokens} tokens: {len(dataset)} window(s) of {max_length + 1} tokens "
            f"(stride {stride}), but at least {needed} {'are' if needed > 1 else 'is'} needed. "
            "Use a longer text, a smaller --context-length or --stride, or a smaller --batch-size")
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      num_workers=num_workers, generator=generator)


def read_text(path: str | os.PathLike) -> str:
    """Read a UTF-8 text file, with clear errors for a missing or empty file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"text file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if not text.strip():
        raise DataError(f"text file is empty: {path}")
    return text


def split_text(text: str, train_ratio: float = 0.9) -> tuple[str, str]:
    """First `train_ratio` of the characters for training, the rest for validation (the book's split)."""
    if not 0.0 < train_ratio < 1.0:
        raise DataError(f"train ratio must be between 0 and 1, got {train_ratio}")
    split_idx = int(train_ratio * len(text))
    return text[:split_idx], text[split_idx:]
