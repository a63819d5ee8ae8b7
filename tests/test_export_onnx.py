"""`llmclf export --format onnx` and the ONNX backend of predict / evaluate / serve."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from llmclf.classifier import load_classifier
from llmclf.cli import app
from llmclf.engines.onnx import ONNXClassifier
from llmclf.errors import CheckpointError, ConfigError
from llmclf.export import export_model
from llmclf.training.calibration import apply_temperature
from tiny_classifier import NEGATIVE, POSITIVE, tiny_classifier_dir, toy_data

runner = CliRunner()
TEXTS = [POSITIVE, NEGATIVE, "ok", "item 3: great", "today: " + "awful terrible sad " * 30, "<|endoftext|>",
         "mixed: great awful"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_dir: Path) -> Path:
    return tiny_classifier_dir(tmp_path_factory, shared_dir)


@pytest.fixture(scope="module")
def exported(trained: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "clf-onnx"
    result = runner.invoke(app, ["export", "--model", str(trained), "--format", "onnx", "--quantize", "int8",
                                 "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    return out


def test_export_writes_a_checked_self_describing_directory(exported: Path, trained: Path):
    import onnx

    assert sorted(p.name for p in exported.iterdir()) == ["config.json", "encoder.json", "model.int8.onnx",
                                                          "model.onnx", "vocab.bpe"]
    umask = os.umask(0)
    os.umask(umask)
    assert exported.stat().st_mode & 0o777 == 0o777 & ~umask  # deployable: not private like a temporary directory
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in exported.iterdir())
    for graph in ("model.onnx", "model.int8.onnx"):
        onnx.checker.check_model(str(exported / graph), full_check=True)
    sidecar = json.loads((exported / "config.json").read_text())
    source = json.loads((trained / "config.json").read_text())
    assert sidecar["engine"] == "onnx" and sidecar["labels"] == source["labels"] == ["neg", "pos"]
    assert sidecar["max_length"] == source["max_length"] and sidecar["tokenizer"]["pad_id"] == 50256
    assert sidecar["onnx"]["inputs"] == ["input_ids", "attention_mask"]
    assert sidecar["onnx"]["max_abs_diff_vs_torch"] < 1e-4
    # dynamic axes: any batch size and sequence length
    model = onnx.load(str(exported / "model.onnx"), load_external_data=False)
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input]
    assert all(isinstance(d, str) for dim in dims for d in dim), dims


def test_onnx_backend_gives_pytorchs_probabilities(exported: Path, trained: Path):
    torch_clf = load_classifier(trained, precision="float32")
    onnx_clf = load_classifier(exported, backend="onnx", precision="float32")
    assert isinstance(onnx_clf, ONNXClassifier) and onnx_clf.classes_ == torch_clf.classes_
    expected = torch_clf.predict_proba(TEXTS)
    for batch_size in (1, 3, 32):  # padding, ordering and truncation (the long text) as in PyTorch
        np.testing.assert_allclose(onnx_clf.predict_proba(TEXTS, batch_size=batch_size), expected, atol=1e-4)
    assert onnx_clf.predict([POSITIVE, NEGATIVE]) == ["pos", "neg"]
    int8 = load_classifier(exported)  # auto: the int8 graph the directory has
    assert int8.info()["precision"] == "int8" and int8.info()["backend"] == "onnx"
    probs = int8.predict_proba(TEXTS)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert int8.predict([POSITIVE, NEGATIVE]) == ["pos", "neg"]


def test_cli_predict_evaluate_and_a_resumable_file_through_onnx(exported: Path, trained: Path, tmp_path: Path):
    from llmclf.data.classification import write_labelled

    texts_args = ["predict", "--precision", "float32", "--json", POSITIVE, NEGATIVE]
    by_backend = {}
    for backend, model in (("torch", trained), ("onnx", exported)):
        result = runner.invoke(app, [*texts_args, "--model", str(model), "--backend", backend])
        assert result.exit_code == 0, result.output
        by_backend[backend] = [json.loads(line) for line in result.output.splitlines()]
    assert [r["label"] for r in by_backend["onnx"]] == [r["label"] for r in by_backend["torch"]] == ["pos", "neg"]
    for a, b in zip(by_backend["onnx"], by_backend["torch"], strict=True):
        assert abs(a["probabilities"]["pos"] - b["probabilities"]["pos"]) < 1e-4

    data = toy_data(40, offset=500)
    write_labelled(data, tmp_path / "test.csv")
    metrics = {}
    for backend, model in (("torch", trained), ("onnx", exported)):
        result = runner.invoke(app, ["evaluate", "--model", str(model), "--data", str(tmp_path / "test.csv"),
                                     "--precision", "float32", "--json"])
        assert result.exit_code == 0, result.output
        metrics[backend] = json.loads(result.output)
    assert metrics["onnx"]["confusion_matrix"] == metrics["torch"]["confusion_matrix"]
    assert abs(metrics["onnx"]["loss"] - metrics["torch"]["loss"]) < 1e-4
    outputs = {}
    for backend, model in (("torch", trained), ("onnx", exported)):
        out = tmp_path / f"{backend}.jsonl"
        result = runner.invoke(app, ["predict", "--model", str(model), "--input", str(tmp_path / "test.csv"),
                                     "--output", str(out), "--chunk-size", "7", "--precision", "float32",
                                     "--no-progress"])
        assert result.exit_code == 0, result.output
        outputs[backend] = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["label"] for r in outputs["onnx"]] == [r["label"] for r in outputs["torch"]]
    assert len(outputs["onnx"]) == 40


@pytest.mark.parametrize(("pooling", "encoder", "blend"), [("mean", False, "log"), ("mean-blocks", True, "mean")])
def test_the_ensemble_and_mean_pooling_survive_the_export(trained: Path, tmp_path: Path, pooling: str,
                                                          encoder: bool, blend: str, tiny_encoder_dir: Path):
    from llmclf.engines.scratch import TextClassifier

    data = toy_data(24)
    ensemble = f"tfidf+{tiny_encoder_dir}" if encoder else "tfidf"
    clf = TextClassifier(str(trained.with_name(trained.name + "-lm")), pooling=pooling, ensemble=ensemble, epochs=1,
                         template="Review: {text}\nSentiment:", precision="float32", log_every=1000, blend=blend)
    clf.fit(data, toy_data(12, offset=100), progress=False)
    clf.save(tmp_path / "clf")
    export_model(tmp_path / "clf", tmp_path / "onnx", "onnx")
    assert (tmp_path / "onnx" / "ngrams.safetensors").is_file()
    onnx_clf = load_classifier(tmp_path / "onnx")
    assert onnx_clf.ngrams_ is not None and onnx_clf.template_ == clf.template_ and onnx_clf.ngrams_.rule == blend
    assert (onnx_clf.encoder_ is not None) == encoder == (tmp_path / "onnx" / "encoder.safetensors").is_file()
    np.testing.assert_allclose(onnx_clf.predict_proba(TEXTS), load_classifier(tmp_path / "clf",
                               precision="float32").predict_proba(TEXTS), atol=1e-4)


def test_the_temperature_and_decision_threshold_carry_over(trained: Path, tmp_path: Path):
    clf = load_classifier(trained, precision="float32")
    uncalibrated = clf._probabilities(TEXTS, 8, dropout=False)
    clf.temperature_ = 0.5
    p_pos = clf.predict_proba(TEXTS)[:, 1]
    threshold = float(np.sort(p_pos)[-2] + np.sort(p_pos)[-1]) / 2  # only the likeliest text is pos
    clf.set_decision_threshold(threshold)
    clf.save(tmp_path / "calibrated")
    export_model(tmp_path / "calibrated", tmp_path / "onnx", "onnx")
    sidecar = json.loads((tmp_path / "onnx" / "config.json").read_text())
    assert sidecar["calibration"]["temperature"] == 0.5 and sidecar["decision_threshold"]["threshold"] == threshold
    torch_clf = load_classifier(tmp_path / "calibrated", precision="float32")
    onnx_clf = load_classifier(tmp_path / "onnx", precision="float32")
    expected = torch_clf.predict_proba(TEXTS)
    np.testing.assert_allclose(expected, apply_temperature(uncalibrated, 0.5), atol=1e-6)
    np.testing.assert_allclose(onnx_clf.predict_proba(TEXTS), expected, atol=1e-4)
    assert onnx_clf.predict(TEXTS) == torch_clf.predict(TEXTS) == ["pos" if p >= threshold else "neg" for p in p_pos]
    assert onnx_clf.predict(TEXTS).count("pos") == 1


def test_transformers_engine_models_export_too(tmp_path: Path):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from llmclf.engines.hf import HFClassifier

    words = ["great", "wonderful", "happy", "awful", "terrible", "sad", "today", "item"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(tmp_path / "bert")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(tmp_path / "bert")
    clf = HFClassifier(str(tmp_path / "bert"), epochs=1, precision="float32", log_every=1000)
    clf.fit(toy_data(16), toy_data(8, offset=50), progress=False)
    clf.save(tmp_path / "clf")
    export_model(tmp_path / "clf", tmp_path / "onnx", "onnx")
    texts = ["today great wonderful", "awful", "item " * 100]
    np.testing.assert_allclose(load_classifier(tmp_path / "onnx").predict_proba(texts, batch_size=2),
                               load_classifier(tmp_path / "clf", precision="float32").predict_proba(texts), atol=1e-4)


def test_serve_runs_the_onnx_backend_and_refuses_mc_dropout_clearly(exported: Path, trained: Path):
    from fastapi.testclient import TestClient

    from llmclf.serve import create_app

    expected = load_classifier(trained, precision="float32").predict_proba([POSITIVE, NEGATIVE])
    with TestClient(create_app(load_classifier(exported, precision="float32"), max_wait_ms=20)) as client:
        response = client.post("/v1/classify", json={"texts": [POSITIVE, NEGATIVE]})
        assert response.status_code == 200, response.text
        got = [[r["probabilities"][c] for c in ("neg", "pos")] for r in response.json()["results"]]
        np.testing.assert_allclose(got, expected, atol=1e-4)
        response = client.post("/v1/classify", json={"texts": [POSITIVE], "mc_dropout": 3})
        assert response.status_code == 422 and "ONNX" in response.text and "--backend torch" in response.text
        assert client.get("/v1/model").json()["backend"] == "onnx"


def test_mc_dropout_through_onnx_is_a_clear_error(exported: Path):
    result = runner.invoke(app, ["predict", "--model", str(exported), "--mc-dropout", "3", POSITIVE])
    assert isinstance(result.exception, ConfigError), result.output
    assert "MC-dropout" in str(result.exception) and "--backend torch" in str(result.exception)


def test_backend_and_model_mismatches_are_clear_errors(exported: Path, trained: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="ONNX export; --backend torch"):
        load_classifier(exported, backend="torch")
    with pytest.raises(ConfigError, match="not an ONNX export; export it first"):
        load_classifier(trained, backend="onnx")
    with pytest.raises(ConfigError, match="int8 runs the int8 graph"):
        load_classifier(trained, precision="int8")
    with pytest.raises(ConfigError, match="ONNX backend runs float32 or int8"):
        load_classifier(exported, precision="bfloat16")
    with pytest.raises(ConfigError, match="give its directory"):
        load_classifier(exported / "model.onnx")
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(exported / "model.onnx", bare / "model.onnx")
    with pytest.raises(ConfigError, match="no config.json, the sidecar"):
        load_classifier(bare)
    # a sidecar that does not describe its graph
    wrong = tmp_path / "wrong"
    shutil.copytree(exported, wrong)
    sidecar = json.loads((wrong / "config.json").read_text())
    sidecar["onnx"]["inputs"] = ["ids", "mask"]
    (wrong / "config.json").write_text(json.dumps(sidecar))
    with pytest.raises(CheckpointError, match=r"takes inputs \(input_ids, attention_mask\) but its config.json says"):
        load_classifier(wrong)
    (wrong / "model.int8.onnx").unlink()
    with pytest.raises(CheckpointError, match="model.int8.onnx is missing"):
        load_classifier(wrong)
    result = runner.invoke(app, ["predict", "--model", str(exported), "--backend", "torch", POSITIVE])
    assert isinstance(result.exception, ConfigError) and "--backend onnx" in str(result.exception)


def test_bad_exports_are_refused_and_leave_nothing_half_written(trained: Path, exported: Path, tmp_path: Path,
                                                                monkeypatch, tiny_checkpoint: Path):
    with pytest.raises(ConfigError, match="is a language model, not a classifier"):
        export_model(tiny_checkpoint, tmp_path / "x", "onnx")
    with pytest.raises(ConfigError, match="not a trained llmclf classifier"):
        export_model(tmp_path, tmp_path / "x", "onnx")
    with pytest.raises(ConfigError, match="already an ONNX export"):
        export_model(exported, tmp_path / "x", "onnx")
    with pytest.raises(ConfigError, match="onnx only"):
        export_model(trained, tmp_path / "x", "hf", quantize="int8")
    with pytest.raises(ConfigError, match="overlaps the model directory"):
        export_model(trained, trained / "onnx", "onnx")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["export", "--model", str(trained), "--out", str(busy)])
    assert isinstance(result.exception, ConfigError) and "--force" in str(result.exception)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]

    import onnxruntime.quantization

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(args[1]))

    monkeypatch.setattr(onnxruntime.quantization, "quantize_dynamic", disk_full)
    with pytest.raises(OSError, match="the disk is full|No space left"):
        export_model(trained, busy, "onnx", quantize="int8", force=True)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]  # the old directory, whole
    assert not [p.name for p in tmp_path.iterdir() if "export" in p.name]  # no staging directory left
    monkeypatch.undo()
    export_model(trained, busy, "onnx", force=True)  # --force replaces the directory whole
    assert "keep.txt" not in os.listdir(busy) and (busy / "model.onnx").is_file()
