"""`--report-to tensorboard|mlflow`: what training logs is read back from the event files / the MLflow store."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from llmclf.classifier import train_classifier
from llmclf.data.classification import write_labelled
from llmclf.errors import ConfigError
from llmclf.training.args import TrainArgs
from tiny_classifier import toy_data

EPOCHS = 2
OPTIONS = dict(trainable="head", pooling="mean", template=None, epochs=EPOCHS, lr=3e-3, batch_size=8,
               ensemble="none", log_every=1, eval_iter=1, precision="float32")


def _train(tmp_path: Path, model: Path, report_to: str, out: Path | None = None, resume: bool = False, **more):
    data = tmp_path / "toy.csv"
    if not data.exists():
        write_labelled(toy_data(16), data)
    out = out or tmp_path / report_to
    clf, result = train_classifier(str(model), data, data, out, test_file=data, progress=False, resume=resume,
                                   train_args={**OPTIONS, "report_to": report_to, **more})
    return clf, result, out


def test_report_to_is_a_training_option_that_does_not_change_the_result():
    assert TrainArgs.defaults("scratch")["report_to"] == TrainArgs.defaults("hf")["report_to"] == "none"
    assert "report_to" not in TrainArgs.for_engine("scratch").result_options("scratch")
    with pytest.raises(ConfigError, match="--report-to must be one of none, tensorboard, mlflow"):
        TrainArgs.for_engine("scratch", report_to="wandb")


def test_tensorboard_event_files_hold_every_metric(tmp_path, tiny_checkpoint):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    clf, result, out = _train(tmp_path, tiny_checkpoint, "tensorboard")
    steps = clf.history_.global_step  # 16 texts / 8 per batch x 2 epochs
    acc = EventAccumulator(str(out / "runs")).Reload()
    scalars = acc.Tags()["scalars"]
    assert len(acc.Scalars("train/loss")) == steps == 4
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert len(acc.Scalars("val/accuracy")) == EPOCHS and len(acc.Scalars("epoch/train_accuracy")) == EPOCHS
    assert {"train/lr", "estimate/train_loss", "estimate/val_loss", "val/macro_f1", "val/loss"} <= set(scalars)
    final = acc.Scalars("final/test_accuracy")
    assert len(final) == 1 and math.isclose(final[0].value, result["test"]["accuracy"], rel_tol=1e-6)
    assert math.isclose(acc.Scalars("final/validation_accuracy")[0].value, result["validation"]["accuracy"],
                        rel_tol=1e-6)
    options = acc.Tensors("options/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| lr | 0.003 |" in options and "| trainable_parameters |" in options
    # metrics.jsonl and the event file agree
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if r["event"] == "step"]
    logged = [e.value for e in acc.Scalars("train/loss")]  # (float32 in the event file)
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(logged, losses, strict=True))


def test_mlflow_store_holds_params_metrics_and_one_run(tmp_path, tiny_checkpoint):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    clf, result, out = _train(tmp_path, tiny_checkpoint, "mlflow")
    saved = json.loads((out / "tracking.json").read_text())
    client = MlflowClient(tracking_uri=saved["tracking_uri"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs] == [saved["mlflow_run_id"]]
    run = runs[0]
    assert run.data.params["lr"] == "0.003" and run.data.params["epochs"] == str(EPOCHS)
    assert int(run.data.params["parameters"]) > int(run.data.params["trainable_parameters"]) > 0
    assert len(client.get_metric_history(run.info.run_id, "val/accuracy")) == EPOCHS
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == clf.history_.global_step
    assert math.isclose(run.data.metrics["final/test_accuracy"], result["test"]["accuracy"], rel_tol=1e-6)
    assert run.info.status == "FINISHED"
    _train(tmp_path, tiny_checkpoint, "mlflow")  # a fresh run in the same directory replaces the old one
    again = json.loads((out / "tracking.json").read_text())["mlflow_run_id"]
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert again != run.info.run_id and [r.info.run_id for r in runs] == [again]


def test_a_missing_package_is_a_clear_error(tmp_path, monkeypatch):
    import importlib.util

    from llmclf.tracking import open_tracker

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"--report-to mlflow needs the mlflow-skinny package: pip install"):
        open_tracker("mlflow", tmp_path)


@pytest.mark.parametrize("report_to", ["tensorboard", "mlflow"])
def test_resume_continues_the_same_run(tmp_path, tiny_checkpoint, monkeypatch, report_to):
    pytest.importorskip(report_to)
    from llmclf.training.state import TrainingInterruptedError

    monkeypatch.setenv("LLMCLF_FAULT", "step:3:SIGTERM")  # stopped after step 3 of 4 (its state saved)
    with pytest.raises(TrainingInterruptedError):
        _train(tmp_path, tiny_checkpoint, report_to)
    monkeypatch.delenv("LLMCLF_FAULT")
    clf, result, out = _train(tmp_path, tiny_checkpoint, report_to, resume=True)
    if report_to == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(out / "runs")).Reload()
        assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
        assert [e.step for e in acc.Scalars("val/accuracy")] == [2, 4]
    else:
        from mlflow.tracking import MlflowClient

        saved = json.loads((out / "tracking.json").read_text())
        client = MlflowClient(tracking_uri=saved["tracking_uri"])
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert [r.info.run_id for r in runs] == [saved["mlflow_run_id"]]
        assert [m.step for m in client.get_metric_history(saved["mlflow_run_id"], "train/loss")] == [1, 2, 3, 4]
        assert runs[0].info.status == "FINISHED" and "final/test_accuracy" in runs[0].data.metrics


def test_hf_engine_reports_the_same_names(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from test_hf_engine import _tiny_bert_dir

    bert = _tiny_bert_dir(tmp_path / "bert")
    data = tmp_path / "reviews.csv"
    from test_hf_engine import _reviews

    write_labelled(_reviews(16, 1), data)
    out = tmp_path / "hf"
    clf, result = train_classifier(str(bert), data, data, out, test_file=data, progress=False,
                                   train_args={"epochs": 2, "batch_size": 8, "log_every": 1, "report_to": "tensorboard",
                                               "precision": "float32"})
    acc = EventAccumulator(str(out / "runs")).Reload()
    assert len(acc.Scalars("train/loss")) == clf.history_["global_step"] == 4
    assert len(acc.Scalars("val/accuracy")) == 2 and "train/lr" in acc.Tags()["scalars"]
    assert math.isclose(acc.Scalars("final/test_accuracy")[0].value, result["test"]["accuracy"], rel_tol=1e-6)
    assert "| engine | hf |" in acc.Tensors("options/text_summary")[0].tensor_proto.string_val[0].decode()
