"""Reading and writing tensor files safely, and loading state dicts with named errors."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llmclf.errors import CheckpointError, LlmclfError


def read_tensor_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` file or a PyTorch pickle read with `weights_only=True`.

    A PyTorch file holding `{"model_state_dict": ...}` (the book's training checkpoints) gives
    that inner dict. Nothing in the file is executed.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
    obj = load_torch_file(path)
    if isinstance(obj, Mapping) and "model_state_dict" in obj:
        obj = obj["model_state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return dict(obj)


def load_torch_file(path: str | os.PathLike) -> Any:
    """What `torch.save` wrote to `path`, read with `torch.load(weights_only=True)`: tensors, numbers,
    strings and containers of them. A pickle that names any other Python object (which could run
    code) is refused with a CheckpointError, as is a file that is not a `torch.save` file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not str(exc).startswith(_TORCH_REFUSED):
            raise CheckpointError(f"{path} is not a PyTorch tensor file written by torch.save (corrupt?): "
                                  f"{_first_line(exc)}") from exc
        # torch's message advises loading the file unsafely: never repeat that for an untrusted file.
        found = sorted(set(re.findall(r"GLOBAL (\S+?)(?:\s|$)", str(exc))))
        raise CheckpointError(
            f"{path} contains Python objects other than tensors{' (' + ', '.join(found) + ')' if found else ''}, "
            "and loading them could run code: llmclf refuses to run code from files. If you trust the file, "
            "convert it to safetensors in a separate, trusted environment (or ask its publisher for a "
            ".safetensors file) and load that instead") from None
    except Exception as exc:  # torch raises zip, runtime and OS errors for foreign or truncated files
        raise CheckpointError(f"{path} is not a PyTorch tensor file written by torch.save (truncated or corrupt?): "
                              f"{type(exc).__name__}: {_first_line(exc)}") from exc


_TORCH_REFUSED = "Weights only load failed"  # how torch starts the message when weights_only refuses a pickle


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def load_state_dict_checked(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """`model.load_state_dict(state_dict)` that names every missing, unexpected or misshaped tensor."""
    check_state_fits(model, state_dict, source)
    model.load_state_dict({k: v for k, v in state_dict.items() if not k.endswith(".att.mask")})


def check_state_fits(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """A CheckpointError naming every tensor of `model` (which may be on the meta device) that
    `state_dict` lacks, has too many or shapes differently."""
    expected = model.state_dict()
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith(".att.mask")}  # book buffers
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {_preview(unexpected)}")
    if misshaped:
        problems.append(f"shape mismatch: {_preview(misshaped)}")
    if problems:
        raise CheckpointError(f"{source} does not fit the model configuration: " + "; ".join(problems))


def _preview(items: list[str], limit: int = 5) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


# A failed write, in the words of the error messages (errno -> what happened).
_WRITE_FAILURES = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                   errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                   errno.EROFS: "the file system is read-only", errno.EFBIG: "the file is too large"}
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust writers (safetensors, tokenizers) name the errno


class WriteError(LlmclfError, OSError):
    """A file could not be written (disk full, permission denied, ...): an OSError with the errno and the
    path the caller asked for (not a temporary name). What was there before is intact."""

    def __init__(self, errno_: int | None, strerror: str | None, path: str | os.PathLike, note: str = "") -> None:
        super().__init__(errno_, strerror, os.fspath(path))
        self.note = note

    def __str__(self) -> str:
        reason, detail = _WRITE_FAILURES.get(self.errno), self.strerror or "failed"
        what = detail if reason is None else reason if reason.lower() == detail.lower() else f"{reason} ({detail})"
        return f"cannot write {self.filename}: {what}{self.note}"


def write_error(exc: BaseException, path: str | os.PathLike, any_file: bool = False) -> WriteError | None:
    """`exc` as a WriteError naming `path`, when it is an OS error while writing `path`: an OSError about
    no file, `path`, a directory above it, a file beside it (its temporary name) or in it, or a Rust
    writer's "(os error N)". Any OSError with `any_file`. None for other errors (e.g. a source file that is
    missing), which callers re-raise unchanged."""
    if isinstance(exc, WriteError):
        return exc
    if isinstance(exc, OSError):
        path, named = Path(path), _named_files(exc)  # (a copy's ENOSPC names its source, then its target)
        if not any_file and named and not any(about == path or about in path.parents or about.parent == path.parent
                                              or about.is_relative_to(path) for about in named):
            return None
        return WriteError(exc.errno, exc.strerror or str(exc), path)
    found = _RUST_OS_ERROR.search(str(exc))
    if found is None:
        return None
    return WriteError(int(found[1]), os.strerror(int(found[1])), path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed to `path`, else removed.

    Readers never see a half-written file, and a crash leaves the previous file intact. A write
    that fails for want of space or permission raises WriteError naming `path`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise write_error(exc, path, any_file=True) from exc
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        error = write_error(exc, path)
        if error is None or error is exc:
            raise
        raise error from exc


@contextlib.contextmanager
def atomic_files(directory: str | os.PathLike, last: str | None = None) -> Iterator[Path]:
    """Write several entries of `directory` as one: yield an empty staging directory inside it; once
    the block has written everything there, each entry replaces the one of the same name in
    `directory` (a directory whole; `last` last), else `directory` is left as it was.

    So a write that fails midway (disk full, permission denied: WriteError naming the entry in
    `directory`) never leaves a mix of old and new files. Entries not written are not touched.
    """
    directory = Path(directory)
    try:
        created = not directory.exists()
        directory.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".llmclf-save-", dir=directory))
    except OSError as exc:
        raise write_error(exc, directory, any_file=True) from exc
    try:
        yield staging
        _move_in(staging, directory, last)
    except BaseException as exc:
        error = _entry_error(exc, staging, directory)
        if error is None:
            raise
        raise error from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                directory.rmdir()  # only if empty: a failed first save leaves no empty directory


def _entry_error(exc: BaseException, staging: Path, directory: Path) -> WriteError | None:
    """A failed write into `staging` as a WriteError naming the entry of `directory` it was for
    (`directory` when the writer does not say which); None when `exc` is about another file."""
    named = _named_files(exc) if isinstance(exc, OSError) else []
    inside = [p for p in named if p.is_relative_to(staging) and p != staging]
    if named and not inside and not any(p == staging or p in staging.parents for p in named):
        return None  # e.g. a source file that is missing
    error = write_error(exc, directory, any_file=True)
    if error is None:
        return None
    entry = directory / inside[0].relative_to(staging).parts[0] if inside else directory
    return WriteError(error.errno, error.strerror, entry, error.note)


def _named_files(exc: OSError) -> list[Path]:
    return [Path(os.fsdecode(name)) for name in (exc.filename, exc.filename2) if name is not None]


def _move_in(staging: Path, directory: Path, last: str | None) -> None:
    """Move every entry of `staging` into `directory` (directories first, `last` last); the entries
    they replace go to `staging` first, and come back if a move fails."""
    names = sorted(os.listdir(staging), key=lambda n: (n == last, not (staging / n).is_dir(), n))
    moved: list[tuple[str, Path | None]] = []
    try:
        for name in names:
            target, backup = directory / name, None
            if target.exists() or target.is_symlink():
                backup = staging / f".{name}-old-{os.getpid()}"
                target.rename(backup)
            moved.append((name, backup))
            (staging / name).rename(target)
    except BaseException:
        for name, backup in reversed(moved):
            with contextlib.suppress(OSError):
                if not (staging / name).exists():
                    (directory / name).rename(staging / name)
                if backup is not None:
                    backup.rename(directory / name)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                            metadata: dict[str, str] | None = None) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` (for optimizer state, read back with `weights_only=True`)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)  # to a Python file: a failed write raises OSError (ENOSPC ...), not a bare RuntimeError
