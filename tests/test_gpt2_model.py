"""GPTModel against the book's GPTModel and Hugging Face GPT-2."""

from __future__ import annotations

import json

import pytest
import torch

from llmclf.config import GPTConfig
from llmclf.errors import CheckpointError, ConfigError
from llmclf.loaders.spec import load_model
from llmclf.models.gpt2 import GPTModel

book_ch04 = pytest.importorskip("llms_from_scratch.ch04", reason="the book's package llms-from-scratch")


def test_same_init_names_and_order_as_the_book(tiny_cfg):
    torch.manual_seed(123)
    ours = GPTModel(tiny_cfg)
    torch.manual_seed(123)
    book = book_ch04.GPTModel(tiny_cfg.to_dict())
    book_state = {k: v for k, v in book.state_dict().items() if not k.endswith("att.mask")}
    assert list(ours.state_dict()) == list(book_state)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, book_state[name]), name


def test_logits_equal_the_books(tiny_model, tiny_cfg):
    book = book_ch04.GPTModel(tiny_cfg.to_dict()).eval()
    book.load_state_dict(tiny_model.state_dict(), strict=False)  # the book's mask buffer stays
    x = torch.randint(0, tiny_cfg.vocab_size, (3, 17))
    torch.testing.assert_close(tiny_model(x), book(x), atol=1e-5, rtol=1e-5)


def test_book_classifier_state_dict_loads_without_renaming(tmp_path, tiny_cfg, gpt2_tokenizer_dir):
    """A chapter-6 `review_classifier.pth`: the book's model with a 2-class out_head."""
    torch.manual_seed(1)
    book = book_ch04.GPTModel(tiny_cfg.to_dict())
    book.out_head = torch.nn.Linear(tiny_cfg.emb_dim, 2)
    torch.save(book.state_dict(), tmp_path / "review_classifier.pth")
    (tmp_path / "tiny.json").write_text(json.dumps(tiny_cfg.to_dict() | {"name": "tiny"}))

    # plain PyTorch: our model with the same head accepts the book's keys (its mask buffers too)
    ours = GPTModel(tiny_cfg)
    ours.out_head = torch.nn.Linear(tiny_cfg.emb_dim, 2)
    ours.load_state_dict(torch.load(tmp_path / "review_classifier.pth", weights_only=True))

    loaded, _ = load_model(tmp_path / "review_classifier.pth", base_config=str(tmp_path / "tiny.json"),
                           tokenizer_dir=gpt2_tokenizer_dir)
    x = torch.randint(0, tiny_cfg.vocab_size, (2, 9))
    torch.testing.assert_close(loaded(x), book.eval()(x), atol=1e-5, rtol=1e-5)
    assert loaded(x).shape == (2, 9, 2)


def test_padding_mask_gives_padding_side_independent_logits(tiny_model):
    torch.manual_seed(0)
    short, long_ = torch.randint(0, 50000, (1, 5)), torch.randint(0, 50000, (1, 9))
    pad = 50256
    right = torch.cat([torch.cat([short, torch.full((1, 4), pad)], 1), long_])
    left = torch.cat([torch.cat([torch.full((1, 4), pad), short], 1), long_])
    mask_right = torch.tensor([[1] * 5 + [0] * 4, [1] * 9])
    mask_left = torch.tensor([[0] * 4 + [1] * 5, [1] * 9])
    alone = tiny_model(short)[0]
    out_right = tiny_model(right, attention_mask=mask_right)
    out_left = tiny_model(left, attention_mask=mask_left)
    torch.testing.assert_close(out_right[0, :5], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_left[0, 4:], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_right[1], tiny_model(long_)[0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out_left).all()  # fully padded query rows do not produce NaN


def test_too_long_input_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="context length of 32"):
        tiny_model(torch.zeros(1, 33, dtype=torch.long))


def test_config_validation_names_the_problem():
    with pytest.raises(ConfigError, match="divisible"):
        GPTConfig(emb_dim=10, n_heads=3)
    with pytest.raises(ConfigError, match="valid names: gpt2-small"):
        GPTConfig.from_name("gpt3")
    assert GPTConfig.from_name("gpt2-xl").emb_dim == 1600


@pytest.mark.parametrize("weights_file", ["model.safetensors", "pytorch_model.bin"])
def test_hugging_face_gpt2_directory_gives_the_same_logits(tmp_path, gpt2_tokenizer_dir, weights_file):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=50257, n_positions=48, n_embd=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    if weights_file == "pytorch_model.bin":  # the older format, as older checkpoints ship it
        torch.save(hf.state_dict(), tmp_path / "hf" / weights_file)
        (tmp_path / "hf" / "model.safetensors").unlink()

    model, tokenizer = load_model(tmp_path / "hf", tokenizer_dir=gpt2_tokenizer_dir)
    x = torch.randint(0, 50257, (2, 48))
    with torch.no_grad():
        diff = (model(x) - hf(x).logits).abs().max().item()
    assert diff < 1e-4
    assert model.context_length == 48


def test_state_dict_that_does_not_fit_names_keys_and_shapes(tmp_path, tiny_model, gpt2_tokenizer_dir):
    state = tiny_model.state_dict()
    state["trf_blocks.0.att.W_query.weight"] = torch.zeros(16, 32)
    del state["final_norm.shift"]
    torch.save(state, tmp_path / "bad.pth")
    (tmp_path / "tiny.json").write_text(json.dumps(tiny_model.cfg.to_dict()))
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "bad.pth", base_config=str(tmp_path / "tiny.json"), tokenizer_dir=gpt2_tokenizer_dir)
    message = str(err.value)
    assert "final_norm.shift" in message
    assert "trf_blocks.0.att.W_query.weight: checkpoint (16, 32) vs model (32, 32)" in message


def test_not_a_tensor_file_is_a_clear_error(tmp_path):
    (tmp_path / "notes.pth").write_text("hello")
    with pytest.raises(CheckpointError, match="not a PyTorch tensor file"):
        load_model(tmp_path / "notes.pth", base_config="gpt2-small")


def test_pickled_code_is_not_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (exec, (f"import pathlib; pathlib.Path({str(marker)!r}).write_text('x')",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "evil.pth", base_config="gpt2-small")
    assert not marker.exists()
