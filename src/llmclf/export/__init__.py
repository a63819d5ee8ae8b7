"""`llmclf export`: a trained classifier in a standard format, to use without llmclf's training code.

`--format hf`: a Hugging Face Transformers directory (`AutoModelForSequenceClassification`,
`pipeline("text-classification")`), see `llmclf.export.hf`. `--format onnx`: the classifier from
token ids to class probabilities as an ONNX graph, with an optional int8 copy, read back by
`load_classifier` (`--backend onnx`), see `llmclf.export.onnx`.

The export is written into a staging directory beside `out` and renamed into place when complete:
an export that fails (bad model, disk full, Ctrl+C) leaves nothing half-written and `out` as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmclf.errors import ConfigError, LlmclfError
from llmclf.loaders.tensors import write_error

FORMATS = ("hf", "onnx")
QUANTIZATIONS = ("int8",)
# Every export is read back and checked against llmclf's float32 probabilities; one further off is refused.
MAX_ABS_DIFF = 1e-4


def export_model(model: str | os.PathLike, out: str | os.PathLike, format: str, quantize: str | None = None,
                 force: bool = False) -> dict[str, Any]:
    """Export the trained classifier in directory `model` to `out` as `format` (hf | onnx); with
    `quantize="int8"` (onnx only) also an ONNX Runtime int8 copy. An existing non-empty `out` is
    replaced only with `force`. Returns what was written (files, sizes and the export's checks)."""
    if format not in FORMATS:
        raise ConfigError(f"export format must be one of {', '.join(FORMATS)}, got {format!r}")
    if quantize is not None and (format != "onnx" or quantize not in QUANTIZATIONS):
        raise ConfigError(f"--quantize {quantize}: quantizing applies to --format onnx only, with one of "
                          f"{', '.join(QUANTIZATIONS)}")
    source, out = Path(model), Path(out)
    clf = _trained_classifier(source)
    _check_out(source, out, force)
    with staged_directory(out) as staging:
        if format == "hf":
            from llmclf.export.hf import export_hf

            export_hf(clf, staging, model_path=out)
            report: dict[str, Any] = {}
        else:
            from llmclf.export.onnx import export_onnx

            report = export_onnx(clf, staging, quantize=quantize)
        files = {p.name: p.stat().st_size for p in sorted(staging.iterdir()) if p.is_file()}
    return {"format": format, "out": str(out), "files": files, **report}


def _trained_classifier(source: Path) -> Any:
    """The classifier in `source`, loaded in float32 on the CPU, or a ConfigError saying why it is not one."""
    from llmclf.classifier import load_classifier
    from llmclf.loaders.checkpoint import CONFIG_FILE, read_checkpoint_config

    if not source.is_dir():
        raise ConfigError(f"{source} is not a directory; export takes a classifier directory written by `llmclf train`")
    config = read_checkpoint_config(source, required=False)
    if config is None:
        raise ConfigError(f"{source} is not a trained llmclf classifier ({source / CONFIG_FILE} is missing or is "
                          "not llmclf's); give the --out directory of `llmclf train`")
    if config.get("task") != "classification":
        raise ConfigError(f"{source} is a language model, not a classifier; train one with `llmclf train` first")
    if config.get("engine") == "onnx":
        raise ConfigError(f"{source} is already an ONNX export; export from the directory `llmclf train` wrote")
    try:
        return load_classifier(source, precision="float32", device="cpu")
    except LlmclfError as exc:
        raise ConfigError(f"{source} cannot be loaded as a trained classifier: {exc}") from exc


def _check_out(source: Path, out: Path, force: bool) -> None:
    src, dst = source.resolve(), out.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise ConfigError(f"--out {out} overlaps the model directory {source}; export to a separate directory")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"--out {out} exists and is not empty; choose a new directory or pass --force to replace it")


@contextlib.contextmanager
def staged_directory(out: Path) -> Iterator[Path]:
    """An empty directory beside `out` to write the export in; when the block ends without an error
    it replaces `out` (whole), else it is removed and `out` is left as it was."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    except OSError as exc:
        raise write_error(exc, out, any_file=True) or exc from exc
    try:
        try:
            yield staging
        except OSError as exc:  # disk full, permission denied ... while writing the export
            if write_error(exc, staging) is None:
                raise
            raise write_error(exc, out, any_file=True) from exc
        _share_like_new_files(staging)
        _replace_directory(out, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _share_like_new_files(directory: Path) -> None:
    """The modes a new directory and new files get under the umask (mkdtemp and the atomic writes make
    them private): an export is meant to be deployed and read by other users and services."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _replace_directory(out: Path, new: Path) -> None:
    """Rename `new` to `out`, replacing an existing `out` whole (put back if the rename fails)."""
    old = out.with_name(f"{new.name}.old") if out.exists() else None
    try:
        if old is not None:
            out.rename(old)
        try:
            new.rename(out)
        except OSError:
            if old is not None:
                old.rename(out)
            raise
    except OSError as exc:
        raise write_error(exc, out, any_file=True) from exc
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
