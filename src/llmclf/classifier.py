"""One classifier API over both engines.

`make_classifier(model, ...)` picks the engine for a backbone (`scratch` for llmclf's own GPT-2 and
Llama models, `hf` for encoder models through `transformers`); `load_classifier(path)` reads back a
classifier trained by either. Both give the same interface: `predict`, `predict_proba`,
`predict_mc_dropout`, `evaluate`, `info`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llmclf import distributed
from llmclf.engines import ENGINES, choose_engine
from llmclf.engines.base import TEST_METRICS_FILE, BaseClassifier, MCDropoutResult, NotFittedError, evaluation_report
from llmclf.engines.hf import HFClassifier
from llmclf.engines.onnx import ONNX_FILE, ONNXClassifier
from llmclf.engines.scratch import TextClassifier
from llmclf.errors import ConfigError
from llmclf.loaders.checkpoint import CONFIG_FILE, read_checkpoint_config
from llmclf.loaders.spec import DEFAULT_SEED
from llmclf.loaders.tensors import atomic_write_json
from llmclf.training.args import TrainArgs

BACKENDS = ("auto", "torch", "onnx")

__all__ = ["BaseClassifier", "HFClassifier", "MCDropoutResult", "NotFittedError", "ONNXClassifier", "TextClassifier",
           "evaluation_report", "load_classifier", "make_classifier", "train_classifier"]


def make_classifier(model: str, engine: str = "auto", recipe: str | None = None, **options: Any) -> BaseClassifier:
    """An untrained classifier for backbone `model`; `engine` auto picks `hf` for encoder models
    (BERT family, the packaged `all-minilm-l6-v2`) and `scratch` otherwise. `options` are the
    engine class's constructor arguments; `recipe` (e.g. "course") fills in the ones not given."""
    if engine not in ("auto", *ENGINES):
        raise ConfigError(f"engine must be auto, {' or '.join(ENGINES)}; got {engine!r}")
    if engine == "auto":
        engine = choose_engine(model)
    cls = HFClassifier if engine == "hf" else TextClassifier
    if recipe is not None:
        options = TrainArgs.recipe(recipe, engine, options)
    return cls(model, **options)


def load_classifier(path: str | os.PathLike, backend: str = "auto", **kwargs: Any) -> BaseClassifier:
    """A trained classifier from a directory written by either engine (or a bare state_dict file,
    e.g. the book's `review_classifier.pth`, with `base_config`), or an ONNX export of one (`llmclf
    export --format onnx`): `load_classifier(DIR).predict([...])`.

    `backend`: `torch` (a directory `llmclf train` wrote), `onnx` (an ONNX export, run by ONNX
    Runtime) or `auto` (whichever the directory is). Keyword arguments go to the engine's `load`
    (precision, device, max_length; for state_dict files also base_config, num_classes, labels,
    pooling, tokenizer_dir)."""
    path = Path(path)
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    engine = "scratch"
    if path.is_dir():
        if (path / ONNX_FILE).is_file() and not (path / CONFIG_FILE).is_file():
            raise ConfigError(f"{path} has {ONNX_FILE} but no {CONFIG_FILE}, the sidecar `llmclf export --format onnx` "
                              "writes beside it (labels, template, tokenizer); export the model again")
        engine = read_checkpoint_config(path).get("engine", "scratch")
    elif path.suffix == ".onnx":
        raise ConfigError(f"{path} is an ONNX file; give its directory, written by `llmclf export --format onnx` "
                          "(its config.json says how to read texts into the graph)")
    if backend == "onnx" and engine != "onnx":
        raise ConfigError(f"{path} is a PyTorch model ({engine} engine), not an ONNX export; export it first "
                          f"(llmclf export --model {path} --format onnx --out DIR) or use --backend torch")
    if backend == "torch" and engine == "onnx":
        raise ConfigError(f"{path} is an ONNX export; --backend torch needs the directory `llmclf train` wrote, or "
                          "use --backend onnx")
    if kwargs.get("precision") == "int8" and engine != "onnx":
        raise ConfigError("--precision int8 runs the int8 graph of an ONNX export (llmclf export --format onnx "
                          "--quantize int8); PyTorch models run float32 or bfloat16")
    if engine in ("hf", "onnx"):
        scratch_only = sorted(k for k, v in kwargs.items()
                              if v is not None and k not in ("precision", "device", "max_length"))
        if scratch_only:
            what = "was trained by the Transformers engine" if engine == "hf" else "is an ONNX export"
            raise ConfigError(f"{path} {what}; {', '.join(scratch_only)} apply to from-scratch models only")
        cls = HFClassifier if engine == "hf" else ONNXClassifier
        clf: BaseClassifier = cls.load(path, **{k: v for k, v in kwargs.items() if v is not None})
    else:
        clf = TextClassifier.load(path, **kwargs)
    test_file = path / TEST_METRICS_FILE
    if path.is_dir() and test_file.is_file():
        try:
            clf.config_["test_metrics"] = json.loads(test_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            pass  # informational only
    return clf


def train_classifier(model: str, train_file: str | os.PathLike, val_file: str | os.PathLike, out: str | os.PathLike,
                     engine: str = "auto", recipe: str | None = None, test_file: str | os.PathLike | None = None,
                     text_col: str = "text", label_col: str = "label", progress: bool = True, resume: bool = False,
                     model_options: dict[str, Any] | None = None, train_args: dict[str, Any] | None = None,
                     ) -> tuple[BaseClassifier, dict[str, Any] | None]:
    """`llmclf train`: fit a classifier of backbone `model` on labelled files, save it to `out` and,
    with `test_file`, evaluate it there once (metrics and plots saved in `out`).

    `model_options` are the backbone's options as given (random_init, base_config, context_length,
    drop_rate, qkv_bias, tokenizer_dir; None or False = not given); `train_args` the `TrainArgs` options
    given. Returns the classifier and, on the main process, the report (engine, validation metrics,
    train_seconds, out, test metrics); None on the other ranks of a distributed run."""
    from llmclf.data.classification import read_labelled

    train_args = train_args or {}
    model_options = {k: v for k, v in (model_options or {}).items() if v not in (None, False)}
    if model_options.get("random_init"):
        model_options["seed"] = train_args.get("seed", DEFAULT_SEED)
    clf = make_classifier(model, engine, recipe, **train_args, **({"model_options": model_options}
                                                                 if model_options else {}))
    sep = train_args.get("label_sep")  # multi-label (llmclf.multilabel)
    train_data = read_labelled(train_file, text_col, label_col, sep)
    val_data = read_labelled(val_file, text_col, label_col, sep)
    test_data = read_labelled(test_file, text_col, label_col, sep) if test_file else None
    clf.fit(train_data, val_data, out_dir=out, progress=progress, resume=resume)
    if not distributed.is_main():
        return clf, None  # rank 0 reports
    result = {"engine": clf.engine, "validation": clf.val_metrics_, "train_seconds": round(clf.train_seconds_, 1),
              "out": str(out)}
    if test_data is not None:
        result["test"] = evaluation_report(clf, test_data, plots_dir=out)
        atomic_write_json(Path(out) / TEST_METRICS_FILE, result["test"])
        from llmclf.tracking import open_tracker, track_final

        # the run the training logged to, continued
        track_final(open_tracker(clf.train_args().report_to, out, resume=True), {"test": result["test"]},
                    getattr(clf, "last_step_", 0))
    return clf, result
