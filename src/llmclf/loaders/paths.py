"""The files of a model directory, kept inside it: a name from a config or index, or a symlink,
that leads elsewhere is refused before anything outside is read."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from llmclf.errors import CheckpointError


def leaves_folder(name: str) -> bool:
    """Whether an archive member `name` would be written outside the folder it is unpacked to
    (zip-slip): an absolute or drive path, or a `..` part (either slash)."""
    posix = name.replace("\\", "/")
    return (posix.startswith("/") or ".." in posix.split("/") or "\0" in name
            or bool(PureWindowsPath(name).drive))


def model_file(directory: str | os.PathLike, name: str, source: str | None = None) -> Path:
    """`directory / name`, once it is known to stay inside `directory`.

    `name` must be relative, without `..`; the file, with every symlink followed, must lie inside
    `directory` (itself resolved), or, for a Hugging Face cache snapshot
    (`models--org--name/snapshots/REV/`), in that repository's `blobs/`, where the cache links its
    files. Otherwise a CheckpointError names `source` (the config or index that named the file).
    The file need not exist."""
    directory = Path(directory)
    where = source or str(directory)
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if "\0" in name:
        raise CheckpointError(f"{where} names the file {name!r}, which has a NUL character; refusing to read it")
    if not name or PureWindowsPath(name).is_absolute() or PurePosixPath(name).is_absolute() or ".." in parts:
        raise CheckpointError(f"{where} names the file {name!r}, which is outside the model directory "
                              f"{directory}; refusing to read it")
    path = directory / name
    root = directory.resolve()
    real = path.resolve()
    allowed = [root]
    if root.parent.name == "snapshots":
        allowed.append(root.parent.parent / "blobs")
    if not any(real.is_relative_to(place) for place in allowed):
        raise CheckpointError(f"{path} is a symbolic link to {real}, outside the model directory {directory}; "
                              "refusing to read it (copy the file into the directory if you trust it)")
    return path
