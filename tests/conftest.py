"""Shared fixtures: the `../shared` data directory (via $LLMCLF_SHARED) and tiny random models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from llmclf.config import GPTConfig
from llmclf.loaders.checkpoint import save_checkpoint
from llmclf.models.gpt2 import GPTModel
from llmclf.tokenizer import GPT2Tokenizer, load_gpt2_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The data/tokenizer directory beside the checkout, or $LLMCLF_SHARED."""
    path = Path(os.environ.get("LLMCLF_SHARED", REPO.parent / "shared"))
    if not (path / "tokenizers" / "gpt2" / "encoder.json").is_file():
        pytest.skip(f"shared data not found at {path}; set LLMCLF_SHARED")
    return path


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir(shared_dir: Path) -> Path:
    return shared_dir / "tokenizers" / "gpt2"


@pytest.fixture(scope="session")
def tokenizer(gpt2_tokenizer_dir: Path) -> GPT2Tokenizer:
    return load_gpt2_tokenizer(gpt2_tokenizer_dir)


@pytest.fixture(scope="session")
def verdict_text(shared_dir: Path) -> str:
    return (shared_dir / "data" / "the_verdict" / "the-verdict.txt").read_text(encoding="utf-8")


TINY = {"vocab_size": 50257, "context_length": 32, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
        "drop_rate": 0.0, "qkv_bias": True}


@pytest.fixture
def tiny_cfg() -> GPTConfig:
    return GPTConfig.from_dict(TINY)


@pytest.fixture
def tiny_model(tiny_cfg: GPTConfig) -> GPTModel:
    torch.manual_seed(123)
    return GPTModel(tiny_cfg).eval()


@pytest.fixture
def tiny_checkpoint(tmp_path: Path, tiny_model: GPTModel, tokenizer: GPT2Tokenizer) -> Path:
    """An llmclf checkpoint directory of a tiny random GPT-2 (with tokenizer files)."""
    return save_checkpoint(tmp_path / "tiny", tiny_model, tokenizer)


ENCODER_WORDS = ["match", "goal", "team", "score", "league", "bank", "market", "shares", "profit", "stock", "software",
                 "chip", "computer", "code", "internet", "the", "a", "of", "and", "today", "news", "report", "said",
                 "new", "great", "wonderful", "happy", "awful", "terrible", "sad", "movie", "good", "bad"]


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory) -> Path:
    """A tiny random BERT encoder with a WordPiece tokenizer, saved as Hugging Face ships one (what
    `--ensemble tfidf+DIR` embeds texts with)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = tmp_path_factory.mktemp("encoder") / "tiny-encoder"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *ENCODER_WORDS]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(path)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(path)
    return path
