"""The ONNX backend: a classifier exported by `llmclf export --format onnx`, run by ONNX Runtime.

`ONNXClassifier` is inference only. It reads the same texts the same way as the model it was exported
from (template, truncation that keeps the template's end, ordering by length, padding), so `predict`,
`evaluate` and `serve` give the same results through either backend, up to float rounding (or int8's
quantization error with the int8 copy). MC-dropout needs the PyTorch model: the graph has no dropout.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmclf.data.classification import collate, inference_batches
from llmclf.engines.base import BaseClassifier, NotFittedError
from llmclf.errors import CheckpointError, ConfigError
from llmclf.loaders.checkpoint import read_checkpoint_config
from llmclf.loaders.paths import model_file

ONNX_PRECISIONS = ("auto", "float32", "int8")
ONNX_FILE = "model.onnx"  # the float32 graph `llmclf export --format onnx` writes


def open_session(path: str | os.PathLike, device: str | None = None):
    """An ONNX Runtime session for `path`: all graph optimizations, as many threads as PyTorch uses."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads()
    providers = ["CPUExecutionProvider"]
    if device is not None and device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ConfigError(f"--device {device}: this onnxruntime has no CUDA provider; install onnxruntime-gpu "
                              "or run on the CPU")
        providers.insert(0, "CUDAExecutionProvider")
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
        raise CheckpointError(f"ONNX Runtime cannot load {path}: {type(exc).__name__}: {exc}") from exc


def pad_batch(ids: list[list[int]], pad_id: int, fixed_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`collate`'s right-padded (input_ids, attention_mask), as the int64 arrays ONNX Runtime takes."""
    input_ids, mask = collate(ids, pad_id, fixed_length)
    return input_ids.numpy(), mask.numpy()


def tokenizer_files(clf: BaseClassifier, out_dir: Path) -> dict[str, Any]:
    """Save `clf`'s tokenizer into `out_dir`; returns how to load it again (kind, special ids)."""
    from llmclf.tokenizer import GPT2Tokenizer, HFTokenizer, find_gpt2_tokenizer_files

    tokenizer = clf.tokenizer_
    if isinstance(tokenizer, GPT2Tokenizer | HFTokenizer):
        info = {**tokenizer.save(out_dir), "pad_id": tokenizer.pad_id}
        if isinstance(tokenizer, GPT2Tokenizer) and find_gpt2_tokenizer_files(out_dir) is None:
            raise ConfigError(f"the model's GPT-2 tokenizer ({tokenizer.source}) has no local files to copy; load it "
                              "with --tokenizer-dir DIR (encoder.json + vocab.bpe) or set LLMCLF_GPT2_TOKENIZER_DIR")
        return info
    tokenizer.save_pretrained(str(out_dir))  # the Transformers engine's tokenizer
    return {"kind": "transformers", "pad_id": tokenizer.pad_token_id}


def _load_tokenizer(path: Path, info: dict[str, Any]) -> Any:
    from llmclf.tokenizer import HFTokenizer, load_gpt2_tokenizer

    kind = info.get("kind")
    if kind == "gpt2-bpe":
        return load_gpt2_tokenizer(tokenizer_dir=path)
    if kind == "hf":
        return HFTokenizer.from_dir(path, info.get("eos_id"), info.get("pad_id"), info.get("bos_id"))
    if kind == "transformers":
        from transformers import AutoTokenizer

        for file in path.iterdir():  # from_pretrained would follow a link out of the directory
            model_file(path, file.name)
        return AutoTokenizer.from_pretrained(str(path))
    raise CheckpointError(f"{path}/config.json: unknown tokenizer kind {kind!r} (gpt2-bpe, hf or transformers)")


class ONNXClassifier(BaseClassifier):
    """A classifier exported to ONNX (`llmclf export --format onnx`), for inference with ONNX Runtime.

    Load it with `load_classifier(DIR)` (or `ONNXClassifier.load`); `predict`, `predict_proba`,
    `evaluate` and `info` work as for the PyTorch engines. `precision` picks the graph: `int8` (the
    quantized copy, which `auto` prefers when the directory has it) or `float32`.
    """

    engine = "onnx"
    supports_mc_dropout = False

    def __init__(self, model: str = "") -> None:  # not trainable: no training options
        self.model = model

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {"model": self.model}

    def __repr__(self) -> str:
        return f"ONNXClassifier(model={self.model!r}, precision={getattr(self, 'precision_', None)!r})"

    def fit(self, *args: Any, **kwargs: Any) -> ONNXClassifier:
        raise ConfigError("an ONNX export is for inference only; train with the PyTorch engines (llmclf train), "
                          "then export again")

    def save(self, out_dir: str | os.PathLike) -> Path:
        raise ConfigError("an ONNX export is saved by `llmclf export --format onnx`; copy its directory instead")

    @classmethod
    def load(cls, path: str | os.PathLike, *, precision: str = "auto", device: str | None = None,
             max_length: int | None = None) -> ONNXClassifier:
        """The export in directory `path` (its config.json is the sidecar llmclf wrote beside the graph)."""
        path = Path(path)
        config = read_checkpoint_config(path)
        if config.get("engine") != "onnx":
            raise ConfigError(f"{path} is not an ONNX export (its config.json says engine "
                              f"{config.get('engine', 'scratch')!r}); export it: llmclf export --model {path} "
                              "--format onnx --out DIR")
        if precision not in ONNX_PRECISIONS:
            raise ConfigError(f"the ONNX backend runs {' or '.join(ONNX_PRECISIONS[1:])} (auto: int8 when exported "
                              f"with --quantize int8), not --precision {precision}")
        onnx_info = config.get("onnx") if isinstance(config.get("onnx"), dict) else {}
        files = onnx_info.get("files") or {}
        chosen = ("int8" if "int8" in files else "float32") if precision == "auto" else precision
        if chosen not in files:
            raise ConfigError(f"{path} has no {chosen} graph (it has {', '.join(files) or 'none'}); export it with "
                              "--quantize int8, or use --precision float32")
        graph = model_file(path, str(files[chosen]))
        if not graph.is_file():
            raise CheckpointError(f"{graph} is missing: the directory is incomplete; export it again")
        session = open_session(graph, device)
        expected = list(onnx_info.get("inputs") or [])
        found = [i.name for i in session.get_inputs()]
        if found != expected:
            raise CheckpointError(f"{graph} takes inputs ({', '.join(found)}) but its config.json says "
                                  f"({', '.join(expected)}): the graph and the sidecar do not belong together; "
                                  "export the model again")
        clf = cls(str(config.get("backbone", path)))
        clf.session_, clf.precision_, clf.output_names_ = session, chosen, list(onnx_info.get("outputs") or [])
        clf.classes_ = [str(label) for label in config.get("labels") or []]
        clf.max_length_ = min(max_length or config["max_length"], config["max_length"])
        clf.fixed_length_ = config.get("fixed_length")
        clf.tokenizer_ = _load_tokenizer(path, config.get("tokenizer") or {})
        clf.pad_id_ = int((config.get("tokenizer") or {}).get("pad_id") or 0)
        clf.config_ = config
        clf._restore_fitted(config, path)
        return clf

    def _check_fitted(self) -> None:
        if not hasattr(self, "session_"):
            raise NotFittedError("this ONNXClassifier is not loaded: use load_classifier(DIR)")

    def _torch_module(self) -> torch.nn.Module:
        raise ConfigError("an ONNX export has no PyTorch module")

    def predict_mc_dropout(self, *args: Any, **kwargs: Any) -> Any:
        raise ConfigError("MC-dropout needs dropout layers, which the ONNX graph does not have; use --backend torch "
                          "with the directory `llmclf train` wrote")

    def _explain_access(self):
        from llmclf.explain import ModelAccess

        def forward(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
            return torch.from_numpy(self.session_.run(self.output_names_, feed)[0])

        return ModelAccess(forward, None, torch.device("cpu"), self.pad_id_, self.fixed_length_,
                           outputs_probabilities=True)

    def _probabilities(self, texts: list[str], batch_size: int, dropout: bool) -> np.ndarray:
        ids = self.token_ids(texts)
        out = np.empty((len(ids), len(self.classes_)), dtype=np.float32)
        for idx in inference_batches([self.fixed_length_ or len(x) for x in ids], batch_size):
            input_ids, mask = pad_batch([ids[i] for i in idx], self.pad_id_, self.fixed_length_)
            out[idx] = self.session_.run(self.output_names_, {"input_ids": input_ids, "attention_mask": mask})[0]
        return out

    def info(self) -> dict[str, Any]:
        return {**super().info(), "backend": "onnx", "precision": self.precision_}
