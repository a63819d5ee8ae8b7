"""Generation: the KV cache gives exactly the uncached tokens; sampling, top-k and EOS behave."""

from __future__ import annotations

import pytest
import torch

from llmclf.errors import ConfigError
from llmclf.generation import generate, generate_text_simple
from llmclf.language_model import generate_text


def _prompt(n: int = 5, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, 50000, (batch, n), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("new_tokens", [10, 60])  # 60 runs past the 32-token context: the window slides
def test_kv_cache_gives_the_uncached_tokens(tiny_model, new_tokens):
    prompt = _prompt(batch=2)
    cached = generate(tiny_model, prompt, new_tokens, use_kv_cache=True)
    uncached = generate(tiny_model, prompt, new_tokens, use_kv_cache=False)
    assert cached.shape == (2, 5 + new_tokens)
    assert torch.equal(cached, uncached)


def test_book_greedy_loop_is_the_uncached_greedy_path(tiny_model):
    prompt = _prompt()
    assert torch.equal(generate_text_simple(tiny_model, prompt, 8, 32), generate(tiny_model, prompt, 8))


def test_seeded_sampling_is_reproducible_and_cache_independent(tiny_model):
    prompt = _prompt()

    def sample(use_kv_cache: bool, seed: int) -> torch.Tensor:
        return generate(tiny_model, prompt, 20, temperature=1.5, top_k=50, use_kv_cache=use_kv_cache,
                        generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(True, 1), sample(False, 1))
    assert not torch.equal(sample(True, 1), sample(True, 2))
    assert not torch.equal(sample(True, 1), generate(tiny_model, prompt, 20))  # not greedy


def test_top_k_one_is_greedy(tiny_model):
    prompt = _prompt()
    sampled = generate(tiny_model, prompt, 12, temperature=2.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, generate(tiny_model, prompt, 12))


def test_stops_at_end_of_text(tiny_model):
    prompt = _prompt()
    first = generate(tiny_model, prompt, 1)[0, -1].item()
    out = generate(tiny_model, prompt, 10, eos_id=first)
    assert torch.equal(out, prompt)  # the EOS token itself is not appended, as in the book


def test_generate_text_api(tiny_model, tokenizer):
    text = generate_text(tiny_model, tokenizer, "Every effort moves you", max_new_tokens=5, precision="float32")
    assert text.startswith("Every effort moves you") and len(text) > len("Every effort moves you")
    with pytest.raises(ConfigError, match="empty"):
        generate_text(tiny_model, tokenizer, "")
    with pytest.raises(ConfigError, match="context is 32"):
        generate_text(tiny_model, tokenizer, "word " * 40)
