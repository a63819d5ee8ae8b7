"""Text generation: greedy, temperature and top-k sampling, with or without a KV cache."""

from __future__ import annotations

import torch
import torch.nn as nn


def generate_text_simple(model: nn.Module, idx: torch.Tensor, max_new_tokens: int,
                         context_size: int) -> torch.Tensor:
    """The book's greedy loop: the whole (cropped) context is run again for every new token."""
    return generate(model, idx, max_new_tokens, context_size, use_kv_cache=False)


@torch.no_grad()
def generate(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, context_size: int | None = None,
             temperature: float = 0.0, top_k: int | None = None, eos_id: int | None = None,
             use_kv_cache: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """Append up to `max_new_tokens` tokens to `idx` (B, T) and return the longer (B, T') ids.

    Args:
        context_size: most tokens the model sees (default: its context length); older ones are dropped.
        temperature: 0 is greedy (argmax); above 0 samples from softmax(logits / temperature).
        top_k: sample only among the k most likely tokens.
        eos_id: stop once every sequence produced this id (it is not appended), as the book does.
        use_kv_cache: run the prompt once, then one token at a time against cached keys/values;
            gives exactly the tokens of the uncached path.
        generator: random source for sampling (seeded by the caller for reproducible samples).
    """
    context_size = min(context_size or model.context_length, model.context_length)
    cache = None
    for _ in range(max_new_tokens):
        if not use_kv_cache:
            hidden = model.hidden_states(idx[:, -context_size:])
        elif cache is None or cache.length >= context_size:
            # Prefill, and refill once the window slides: absolute positions shift, so the
            # cached keys are stale (this keeps the cached path equal to the uncached one).
            cache = model.new_kv_cache(min(context_size, idx.shape[1] + max_new_tokens))  # no bigger than needed
            hidden = model.hidden_states(idx[:, -context_size:], kv_cache=cache)
        else:
            hidden = model.hidden_states(idx[:, -1:], kv_cache=cache)
        logits = model.out_head(hidden[:, -1])  # (B, V): only the last position is needed

        idx_next = sample_next_token(logits, temperature, top_k, generator)
        if eos_id is not None and bool((idx_next == eos_id).all()):
            break
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def sample_next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B, 1) from last-position logits (B, V), as the book's `generate`."""
    if top_k is not None:
        top_logits, _ = torch.topk(logits, min(top_k, logits.shape[-1]))
        logits = logits.masked_fill(logits < top_logits[:, -1:], float("-inf"))
    if temperature > 0.0:
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=generator)
    return torch.argmax(logits, dim=-1, keepdim=True)
