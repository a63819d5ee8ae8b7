"""The seeds' printed outputs of the untrained GPT-2 small (torch.manual_seed(123)), exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmclf.generation import generate_text_simple
from llmclf.language_model import evaluate_lm
from llmclf.loaders.spec import load_model
from llmclf.tokenizer import text_to_token_ids, token_ids_to_text


@pytest.fixture(scope="module")
def seeded_gpt2_small(gpt2_tokenizer_dir):
    return load_model("gpt2-small", random_init=True, seed=123, context_length=256, drop_rate=0.1,
                      qkv_bias=False, tokenizer_dir=gpt2_tokenizer_dir)


def test_greedy_generation(seeded_gpt2_small):
    model, tokenizer = seeded_gpt2_small
    out = generate_text_simple(model, text_to_token_ids("Every effort moves you", tokenizer), 10, 256)
    assert token_ids_to_text(out, tokenizer) == "Every effort moves you rentingetic wasnم refres RexMeCHicular stren"


def test_cross_entropy_of_two_batches(seeded_gpt2_small):
    model, _ = seeded_gpt2_small
    inputs = torch.tensor([[16833, 3626, 6100], [40, 1107, 588]])
    targets = torch.tensor([[3626, 6100, 345], [107, 588, 11311]])
    with torch.no_grad():
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
    assert round(loss.item(), 4) == 10.5722


def test_the_verdict_train_and_val_loss(seeded_gpt2_small, verdict_text):
    model, tokenizer = seeded_gpt2_small
    result = evaluate_lm(model, tokenizer, verdict_text, stride=256, batch_size=2, precision="float32")
    assert round(result.train_loss, 4) == 10.9876
    assert round(result.val_loss, 4) == 10.9811
    assert (result.train_batches, result.val_batches) == (9, 1)
