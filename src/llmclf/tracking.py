"""Experiment tracking (`--report-to`): the training options, the model's size, every logged metric and
the final metrics, sent to TensorBoard or MLflow as local files — no account, no server.

One run per output directory: TensorBoard event files in `OUT/runs/`, an MLflow file store in
`OUT/mlruns/` (its run id kept in `OUT/tracking.json`). `--resume` continues the same run: TensorBoard
drops what was logged after the resumed training state (`purge_step`), MLflow reopens the saved run.
The metrics are those of `metrics.jsonl`, named `EVENT_PREFIX[event]/field` (see `metric_names`).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any, Protocol

from llmclf.errors import ConfigError
from llmclf.loaders.tensors import atomic_write_json

REPORT_TO = ("none", "tensorboard", "mlflow")  # `--report-to` (the option itself: `TrainArgs.report_to`)

TENSORBOARD_DIR = "runs"
MLFLOW_DIR = "mlruns"
RUN_FILE = "tracking.json"
EXPERIMENT = "llmclf"
# metrics.jsonl's events -> metric name prefixes; the fields below are positions, not metrics
EVENT_PREFIX = {"step": "train", "eval": "estimate", "epoch": "epoch", "validation": "val", "final": "final"}
POSITION_FIELDS = ("event", "epoch", "step", "examples_seen")
TRAINER_NAMES = {"learning_rate": "lr", "train_loss": "mean_loss"}
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow-skinny")}


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def close(self) -> None: ...


class NoTracker:
    """`--report-to none`, and every rank but 0."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass


def metric_names(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record as tracker metrics: {"event": "validation", "accuracy": 0.9, ...} ->
    {"val/accuracy": 0.9, ...}; non-numeric fields are left out."""
    prefix = EVENT_PREFIX.get(record.get("event", ""), str(record.get("event")))
    return {f"{prefix}/{k}": float(v) for k, v in record.items()
            if k not in POSITION_FIELDS and isinstance(v, int | float) and not isinstance(v, bool)}


def trainer_metric_names(record: dict[str, Any]) -> dict[str, float]:
    """A Trainer log record (the Transformers engine's metrics.jsonl) under the scratch engine's names:
    eval_accuracy -> val/accuracy, loss -> train/loss, learning_rate -> train/lr, train_runtime -> train/runtime."""
    renamed: dict[str, Any] = {}
    for key, value in record.items():
        if key.startswith("eval_"):
            renamed[f"val/{key.removeprefix('eval_')}"] = value
        elif key not in POSITION_FIELDS:
            renamed[f"train/{TRAINER_NAMES.get(key, key.removeprefix('train_'))}"] = value
    return {k: float(v) for k, v in renamed.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _flat(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if not isinstance(value, str) else value
    return out


def _require(report_to: str) -> None:
    import importlib.util

    module, package = PACKAGES[report_to]
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"--report-to {report_to} needs the {package} package: pip install 'llmclf[tracking]' "
                          f"(or pip install {package})")


class TensorBoardTracker:
    """Event files in `OUT/runs/` (torch's SummaryWriter); options as a text summary named "options"."""

    def __init__(self, out_dir: Path, resume_step: int | None = None) -> None:
        _require("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out_dir / TENSORBOARD_DIR), purge_step=resume_step)

    def log_params(self, params: dict[str, Any]) -> None:
        rows = "\n".join(f"| {k} | {v} |" for k, v in _flat(params).items())
        self.writer.add_text("options", "| option | value |\n|---|---|\n" + rows)
        self.writer.flush()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MlflowTracker:
    """An MLflow file store in `OUT/mlruns/`, experiment "llmclf", one run whose id `OUT/tracking.json` keeps."""

    def __init__(self, out_dir: Path, resume: bool) -> None:
        _require("mlflow")
        # MLflow 3 keeps its file store only on request; it needs no database or server, which is the point here.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.uri = (out_dir / MLFLOW_DIR).resolve().as_uri()
        self.client = MlflowClient(tracking_uri=self.uri)
        run_file = out_dir / RUN_FILE
        saved = json.loads(run_file.read_text(encoding="utf-8")) if run_file.is_file() else {}
        if resume and saved.get("mlflow_run_id"):
            self.run_id = saved["mlflow_run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            if saved.get("mlflow_run_id"):  # a fresh run in this directory replaces its old one (marked deleted)
                with contextlib.suppress(Exception):
                    self.client.delete_run(saved["mlflow_run_id"])
            experiment = self.client.get_experiment_by_name(EXPERIMENT)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(EXPERIMENT)
            self.run_id = self.client.create_run(experiment_id, run_name=out_dir.resolve().name).info.run_id
            atomic_write_json(run_file, {"mlflow_run_id": self.run_id, "tracking_uri": self.uri})

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        logged = self.client.get_run(self.run_id).data.params  # a param is written once: resume adds new ones only
        self.client.log_batch(self.run_id, params=[Param(k, v[:6000]) for k, v in _flat(params).items()
                                                   if k not in logged])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def open_tracker(report_to: str, out_dir: str | os.PathLike | None, resume: bool = False,
                 resume_step: int | None = None) -> Tracker:
    """The tracker `--report-to` names for the run in `out_dir` (NoTracker for `none` or no `out_dir`).
    `resume`: continue the directory's run; `resume_step`: the optimizer step training continues from
    (TensorBoard forgets what was logged after it)."""
    if report_to not in REPORT_TO:
        raise ConfigError(f"--report-to must be one of {', '.join(REPORT_TO)}, got {report_to!r}")
    if report_to == "none" or out_dir is None:
        return NoTracker()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if report_to == "tensorboard":  # a fresh run drops the old events; a resumed one, those after its state
        return TensorBoardTracker(out, (None if resume_step is None else resume_step + 1) if resume else 0)
    return MlflowTracker(out, resume)


def track_final(tracker: Tracker, results: dict[str, dict[str, Any]], step: int) -> None:
    """The final metrics, e.g. {"validation": {...}, "test": {...}} -> final/validation_accuracy ...
    at the last optimizer step; the tracker is closed after."""
    record = {"event": "final", **{f"{split}_{k}": v for split, metrics in results.items() if metrics
                                   for k, v in metrics.items()}}
    tracker.log_metrics(metric_names(record), step)
    tracker.close()
