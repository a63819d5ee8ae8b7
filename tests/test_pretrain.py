"""The pretraining loop: learns, writes an atomic checkpoint and plot, resumes exactly."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from llmclf.cli import app
from llmclf.config import GPTConfig
from llmclf.language_model import evaluate_lm, pretrain
from llmclf.loaders.spec import load_model
from llmclf.models.gpt2 import GPTModel

SMALL_TEXT_SETTINGS = {"batch_size": 4, "eval_freq": 5, "eval_iter": 2, "lr": 3e-3, "precision": "float32",
                       "progress": False}


def _fresh_model() -> GPTModel:
    torch.manual_seed(123)
    return GPTModel(GPTConfig(context_length=32, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.1))


def test_loss_falls_and_checkpoint_is_complete(tmp_path, tokenizer, verdict_text):
    model = _fresh_model()
    history = pretrain(model, tokenizer, verdict_text, tmp_path / "run", epochs=2, **SMALL_TEXT_SETTINGS)
    assert history.epochs_done == 2 and len(history.samples) == 2
    assert history.train_losses[-1] < history.train_losses[0] - 1.0
    assert history.tokens_seen == (history.global_step + 1) * 4 * 32
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"model.safetensors", "config.json", "trainer_state.json", "training_state.pt", "loss.png",
            "encoder.json", "vocab.bpe"} <= files
    assert not [f for f in files if f.endswith(".tmp")]
    assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The checkpoint reloads as a model with the same weights and the same loss.
    reloaded, tok = load_model(tmp_path / "run")
    for name, tensor in load_file(tmp_path / "run" / "model.safetensors").items():
        assert torch.equal(reloaded.state_dict()[name], tensor)
    kwargs = {"stride": 32, "batch_size": 4, "precision": "float32"}
    assert evaluate_lm(reloaded, tok, verdict_text, **kwargs) == evaluate_lm(model.eval(), tokenizer, verdict_text,
                                                                             **kwargs)


def test_resume_continues_exactly(tmp_path, tokenizer, verdict_text):
    straight = _fresh_model()
    pretrain(straight, tokenizer, verdict_text, tmp_path / "straight", epochs=2, **SMALL_TEXT_SETTINGS)

    pretrain(_fresh_model(), tokenizer, verdict_text, tmp_path / "resumed", epochs=1, **SMALL_TEXT_SETTINGS)
    resumed = _fresh_model()
    history = pretrain(resumed, tokenizer, verdict_text, tmp_path / "resumed", epochs=2, resume=True,
                       **SMALL_TEXT_SETTINGS)
    assert history.epochs_done == 2
    for name, tensor in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, rtol=0, atol=0)
    saved = json.loads((tmp_path / "resumed" / "trainer_state.json").read_text())
    expected = json.loads((tmp_path / "straight" / "trainer_state.json").read_text())
    assert saved == expected


def test_pretrain_cli(tmp_path, shared_dir, gpt2_tokenizer_dir):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"context_length": 32, "emb_dim": 32, "n_heads": 4, "n_layers": 1}))
    torch.manual_seed(0)
    torch.save(GPTModel(GPTConfig.from_dict(json.loads(config.read_text()))).state_dict(), tmp_path / "init.pth")
    result = CliRunner().invoke(app, [
        "pretrain", "--model", str(tmp_path / "init.pth"), "--base-config", str(config),
        "--text", str(shared_dir / "data/the_verdict/the-verdict.txt"), "--out", str(tmp_path / "out"),
        "--epochs", "1", "--batch-size", "8", "--tokenizer-dir", str(gpt2_tokenizer_dir), "--precision", "float32"])
    assert result.exit_code == 0, result.output
    assert "final train loss" in result.stdout
    assert json.loads((tmp_path / "out" / "config.json").read_text())["epochs_done"] == 1
