"""`llmclf export --format onnx`: the classifier as an ONNX graph, token ids -> class probabilities.

The directory holds `model.onnx` (float32, dynamic batch and sequence axes, from torch's exporter),
optionally `model.int8.onnx` (ONNX Runtime's dynamic int8 quantization of every MatMul's weights), the
tokenizer's files, the n-gram model of a TF-IDF ensemble (and the regression of a sentence-encoder member,
whose encoder still runs in PyTorch), and `config.json`, the sidecar that makes the
directory self-describing: labels, template, max_length, pad id, tokenizer, input and output names, the
calibration temperature and decision threshold (applied after the graph and the n-gram blend, as in PyTorch).
`load_classifier(DIR)` reads it back as an `ONNXClassifier` (llmclf.engines.onnx).
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from llmclf.engines.onnx import ONNX_FILE, pad_batch
from llmclf.errors import ConfigError
from llmclf.export import MAX_ABS_DIFF
from llmclf.loaders.checkpoint import CHECKPOINT_FORMAT, CONFIG_FILE
from llmclf.loaders.tensors import atomic_write_json

log = logging.getLogger(__name__)

INT8_FILE = "model.int8.onnx"
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAMES = ("probabilities",)
# int8: a MatMul whose input has outliers (max |x| above this many times its RMS on the check texts) stays
# float32. Dynamic quantization gives each activation tensor one uint8 scale, so a few huge values (SmolLM2's
# MLP down-projections reach 350x RMS) leave the rest of the tensor a handful of levels: quantizing all of
# SmolLM2 cost 12.7 points on SMS; keeping its 8 such MatMuls (of 210) float32 costs none (README "Measured").
OUTLIER_RATIO = 100.0
# Texts of several lengths that the export is checked on (besides the padding between them), and the
# int8 copy calibrated on (OUTLIER_RATIO).
CHECK_TEXTS = ("ok", "Free entry! Win a prize now, text WIN to 80082.", "See you at the station at six, then dinner?",
               "a " * 40 + "long text that is cut to the model's max_length when the model's max_length is short")


class ProbabilitiesFromIds(nn.Module):
    """What the ONNX graph computes: (input_ids, attention_mask) -> softmax of the class logits, float32
    (a multi-label model's: one sigmoid per label)."""

    def __init__(self, classifier: nn.Module, transformers_model: bool, multi_label: bool = False) -> None:
        super().__init__()
        self.classifier, self.transformers_model = classifier, transformers_model
        self.multi_label = multi_label

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.transformers_model:
            logits = self.classifier(input_ids=input_ids, attention_mask=attention_mask).logits
        else:
            logits = self.classifier(input_ids, attention_mask)
        return torch.sigmoid(logits.float()) if self.multi_label else torch.softmax(logits.float(), dim=-1)


def export_onnx(clf: Any, out_dir: Path, quantize: str | None = None) -> dict[str, Any]:
    """Write `clf` (a trained classifier of either engine, float32 on the CPU) into `out_dir` as ONNX,
    check the graph (`onnx.checker`) and its probabilities against PyTorch's, and with `quantize="int8"`
    add the int8 copy. Returns the checks' figures (also saved in the sidecar)."""
    import onnx

    from llmclf.engines.onnx import tokenizer_files

    transformers_model = clf.engine == "hf"
    module = ProbabilitiesFromIds(clf.model_, transformers_model, clf.label_thresholds is not None).eval()
    fixed_length = clf.max_length_ if getattr(clf.model_, "pooling", None) == "last-position" else None
    tokenizer_info = tokenizer_files(clf, out_dir)
    pad_id = tokenizer_info["pad_id"]
    ids = clf.token_ids(list(CHECK_TEXTS))
    example = pad_batch(ids[1:3], pad_id, fixed_length)  # two lengths: the example has padding
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence", min=1, max=clf.max_length_)
    start = time.perf_counter()
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            module, tuple(torch.from_numpy(a) for a in example), dynamo=True, input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES), dynamic_shapes=({0: batch, 1: sequence}, {0: batch, 1: sequence}),
            optimize=True, verbose=False)
    if program is None:
        raise ConfigError("torch.onnx.export returned no program; this PyTorch's exporter cannot export the model")
    program.save(str(out_dir / ONNX_FILE))
    export_seconds = time.perf_counter() - start
    onnx.checker.check_model(str(out_dir / ONNX_FILE), full_check=True)
    max_diff = _max_diff_vs_torch(module, out_dir / ONNX_FILE, ids, pad_id, fixed_length)
    if not max_diff <= MAX_ABS_DIFF:
        raise ConfigError(f"the exported graph's probabilities differ from PyTorch's by {max_diff:.2e} (more than "
                          f"{MAX_ABS_DIFF:g}); nothing was written. Please report it with the model's family.")
    report: dict[str, Any] = {"export_seconds": round(export_seconds, 1), "max_abs_diff_vs_torch": max_diff}
    files = {"float32": ONNX_FILE}
    if quantize == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        ratios = _matmul_input_outliers(out_dir / ONNX_FILE, ids, pad_id, fixed_length)
        kept = {node: ratio for node, ratio in ratios.items() if ratio[1] > OUTLIER_RATIO}
        quantize_dynamic(out_dir / ONNX_FILE, out_dir / INT8_FILE, weight_type=QuantType.QInt8, per_channel=True,
                         nodes_to_exclude=list(kept))
        onnx.checker.check_model(str(out_dir / INT8_FILE), full_check=True)
        files["int8"] = INT8_FILE
        report["int8_float32_matmuls"] = {scope: round(ratio, 1) for scope, ratio in kept.values()}
        report["int8_matmuls"] = len(ratios) - len(kept)
        report["int8_max_abs_diff_vs_torch"] = _max_diff_vs_torch(module, out_dir / INT8_FILE, ids, pad_id,
                                                                  fixed_length)
    clf._save_blend(out_dir)
    encoder = getattr(clf, "encoder_", None)
    ensemble = "none" if getattr(clf, "ngrams_", None) is None else \
        "tfidf" if encoder is None else f"tfidf+{encoder.name}"
    config = clf.config_
    atomic_write_json(out_dir / CONFIG_FILE, {
        "format": CHECKPOINT_FORMAT, "format_version": 1, "engine": "onnx", "task": "classification",
        "exported_from": {"engine": clf.engine, "backbone": config.get("backbone", str(clf.model))},
        "backbone": config.get("backbone", str(clf.model)), "labels": list(clf.classes_),
        "input_template": clf.template_, "max_length": clf.max_length_, "fixed_length": fixed_length,
        "tokenizer": tokenizer_info, "training": {"ensemble": ensemble,
                                               # the graph classifies one window; ONNXClassifier windows texts
                                               "long_text": clf.long_text_, "aggregate": clf.aggregate_},
        "onnx": {"files": files, "inputs": list(INPUT_NAMES), "outputs": list(OUTPUT_NAMES),
                 "opset": _opset(out_dir / ONNX_FILE), **report},
        **clf.fitted_config(),  # the temperature and decision threshold, applied by ONNXClassifier as by torch
        "metrics": config.get("metrics"), "test_metrics": config.get("test_metrics")})
    return report


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """torch's exporter logs and warns about internals (torchvision ops it skips, axis names) that say
    nothing to a user; its errors still raise."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [logger.level for logger in loggers]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for logger in loggers:
                logger.setLevel(logging.ERROR)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _max_diff_vs_torch(module: nn.Module, path: Path, ids: list[list[int]], pad_id: int,
                       fixed_length: int | None) -> float:
    """Largest |ONNX Runtime - PyTorch| over the check texts, one by one and as one padded batch."""
    from llmclf.engines.onnx import open_session

    session = open_session(path)
    worst = 0.0
    for batch in [[x] for x in ids] + [ids]:
        input_ids, mask = pad_batch(batch, pad_id, fixed_length)
        with torch.no_grad():
            expected = module(torch.from_numpy(input_ids), torch.from_numpy(mask)).numpy()
        got = session.run(list(OUTPUT_NAMES), {"input_ids": input_ids, "attention_mask": mask})[0]
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst


def _matmul_input_outliers(path: Path, ids: list[list[int]], pad_id: int,
                           fixed_length: int | None) -> dict[str, tuple[str, float]]:
    """For each MatMul with constant weights (those int8 quantization converts): node name -> (the module
    it comes from, max |input| / RMS of its input over the check texts)."""
    import ast

    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    weights = {init.name for init in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
    for node in nodes:
        model.graph.output.append(onnx.helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    input_ids, mask = pad_batch(ids, pad_id, fixed_length)
    inputs = session.run([n.input[0] for n in nodes], {"input_ids": input_ids, "attention_mask": mask})
    found = {}
    for node, x in zip(nodes, inputs, strict=True):
        scopes = {p.key: p.value for p in node.metadata_props}.get("pkg.torch.onnx.name_scopes")
        module = ast.literal_eval(scopes)[-2] if scopes else node.name  # the Linear that made the MatMul
        x = x.astype(np.float64)
        found[node.name] = (module.removeprefix("classifier."), float(np.abs(x).max() / max(np.sqrt((x**2).mean()),
                                                                                             1e-12)))
    return found


def _opset(path: Path) -> int | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
