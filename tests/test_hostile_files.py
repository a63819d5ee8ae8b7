"""Hostile artifacts: files an attacker (or a broken download) hands to llmclf's loaders.

Each is refused with a clear llmclf error, runs no code, reads nothing outside the model directory,
and costs seconds and little memory: `bounded` measures the peak RSS growth of the load (Linux
VmHWM, reset through /proc/self/clear_refs) and its time, and fails the test beyond the limits.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import re
import shutil
import struct
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llmclf.config import GPTConfig, LlamaConfig
from llmclf.errors import CheckpointError, DataError
from llmclf.loaders.checkpoint import save_checkpoint
from llmclf.loaders.gguf import read_gguf
from llmclf.loaders.hf_dir import read_hf_dir
from llmclf.loaders.paths import model_file
from llmclf.loaders.spec import load_model
from llmclf.loaders.tensors import read_tensor_file
from llmclf.models import llama
from llmclf.models.gpt2 import GPTModel
from llmclf.models.llama import LlamaModel
from llmclf.tokenizer import HFTokenizer, load_gpt2_tokenizer

MAX_GROWTH = 200 << 20  # bytes; every hostile file below claims gigabytes (or would make a loader loop)
MAX_SECONDS = 5.0


# --- measuring ---------------------------------------------------------------------------------

def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


@contextlib.contextmanager
def bounded(what: str, max_growth: int = MAX_GROWTH) -> Iterator[None]:
    """Fail unless the body runs within MAX_SECONDS and grows the peak RSS by less than `max_growth`."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (the peak RSS) to the current RSS
    except OSError:
        pytest.skip("measuring peak RSS needs Linux's /proc/self/clear_refs")
    before, start = _status_kib("VmRSS") << 10, time.perf_counter()
    yield
    seconds, growth = time.perf_counter() - start, (_status_kib("VmHWM") << 10) - before
    print(f"\n[hostile] {what}: {seconds:.2f} s, peak RSS growth {growth / 2**20:.1f} MiB")
    assert seconds < MAX_SECONDS, f"{what} took {seconds:.1f} s"
    assert growth < max_growth, f"{what} grew the peak RSS by {growth / 2**20:.0f} MiB"


@pytest.fixture(scope="module", autouse=True)
def warm_meta_device() -> None:
    """The first model built on the meta device costs seconds and tens of MiB of one-off setup in torch;
    pay it here, so that `bounded` measures what each hostile file costs."""
    with torch.device("meta"):
        GPTModel(GPTConfig(vocab_size=8, context_length=4, emb_dim=4, n_heads=1, n_layers=1))
        LlamaModel(TINY_LLAMA)


# --- 1. pickles that would run code --------------------------------------------------------------

class Payload:
    """Unpickling this writes `marker`: what a hostile `.pth` does (any code could run instead)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _evil_pickle(path: Path, marker: Path, wrap=lambda payload: {"weight": torch.zeros(2), "x": payload}) -> Path:
    torch.save(wrap(Payload(marker)), path)
    return path


def _assert_refused_clearly(message: str) -> None:
    assert "contains Python objects other than tensors" in message
    assert "refuses to run code" in message and "safetensors" in message and "(exec)" in message
    # "(exec)": the message names what the pickle would call
    assert "weights_only" not in message  # torch's advice to load unsafely is never repeated


def test_the_payload_runs_code_when_unpickled_unsafely(tmp_path):
    """The control: the payload used below really writes its marker when unpickled without guards."""
    pickle.loads(pickle.dumps(Payload(tmp_path / "marker")))
    assert (tmp_path / "marker").read_text() == "pwned"


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin"])
def test_code_running_pickle_is_refused_by_read_tensor_file_and_never_runs(tmp_path, suffix):
    marker = tmp_path / "marker"
    path = _evil_pickle(tmp_path / f"evil{suffix}", marker)
    with pytest.raises(CheckpointError) as err:
        read_tensor_file(path)
    _assert_refused_clearly(str(err.value))
    assert not marker.exists()


def test_code_running_pytorch_model_bin_in_hf_dir_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "marker"
    model_dir = _hf_llama_dir(tmp_path / "hf")
    (model_dir / "model.safetensors").unlink()
    _evil_pickle(model_dir / "pytorch_model.bin", marker)
    with pytest.raises(CheckpointError) as err:
        read_hf_dir(model_dir)
    _assert_refused_clearly(str(err.value))
    assert not marker.exists()


def test_code_running_training_state_is_skipped_with_a_clear_warning_and_never_runs(tmp_path, caplog):
    from llmclf.training.state import STATE_PREFIX, load_training_state

    marker = tmp_path / "marker"
    torch.save({"step": 1}, tmp_path / f"{STATE_PREFIX}00000001.pt")
    _evil_pickle(tmp_path / f"{STATE_PREFIX}00000002.pt", marker, wrap=lambda payload: {"step": 2, "x": payload})
    with caplog.at_level(logging.WARNING):
        state = load_training_state(tmp_path)
    assert state == {"step": 1}  # the newest state that loads safely
    _assert_refused_clearly(caplog.text)
    assert not marker.exists()


def test_code_running_pretraining_state_is_refused_on_resume_and_never_runs(tmp_path, tokenizer):
    from llmclf.language_model import TRAINER_STATE_FILE, TRAINING_STATE_FILE, pretrain

    marker = tmp_path / "marker"
    out = tmp_path / "run"
    out.mkdir()
    _evil_pickle(out / TRAINING_STATE_FILE, marker, wrap=lambda payload: {"epochs_done": 1, "x": payload})
    (out / TRAINER_STATE_FILE).write_text(json.dumps({"epochs_done": 1}))
    model = GPTModel(GPTConfig(vocab_size=50257, context_length=16, emb_dim=16, n_heads=2, n_layers=1))
    with pytest.raises(CheckpointError) as err:
        pretrain(model, tokenizer, "Every effort moves you forward. " * 100, out, epochs=2, resume=True,
                 progress=False)
    _assert_refused_clearly(str(err.value))
    assert not marker.exists()


# --- 2. safetensors with a lying header ----------------------------------------------------------

def _safetensors_bytes(header: dict | bytes, data: bytes, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


GIB = 1 << 30
LYING_SAFETENSORS = {
    "header_length_beyond_the_file": _safetensors_bytes(b"{}", b"", length=64 * GIB),
    "header_length_of_2_to_the_63": _safetensors_bytes(b"{}", b"", length=1 << 63),
    "header_not_json": _safetensors_bytes(b"\x00\xff not json at all }", b"\0" * 16),
    "tensor_bytes_beyond_the_file": _safetensors_bytes(
        {"w": {"dtype": "F32", "shape": [GIB], "data_offsets": [0, 4 * GIB]}}, b"\0" * 16),
    "shape_larger_than_its_bytes": _safetensors_bytes(
        {"w": {"dtype": "F32", "shape": [GIB, GIB], "data_offsets": [0, 16]}}, b"\0" * 16),
    "overlapping_tensors": _safetensors_bytes(
        {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
         "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16),
    "offsets_overflowing_64_bits": _safetensors_bytes(
        {"w": {"dtype": "F32", "shape": [1 << 62, 8], "data_offsets": [0, 16]}}, b"\0" * 16),
}


@pytest.mark.parametrize("lie", list(LYING_SAFETENSORS))
def test_lying_safetensors_header_is_a_clear_error_fast_and_in_bounded_memory(tmp_path, lie):
    path = tmp_path / "model.safetensors"
    path.write_bytes(LYING_SAFETENSORS[lie])
    with bounded(f"safetensors {lie}"), pytest.raises(CheckpointError, match="is not a readable safetensors file"):
        read_tensor_file(path)


# --- 3. GGUF with absurd counts, sizes or offsets ----------------------------------------------

TINY_LLAMA = LlamaConfig(vocab_size=32, context_length=16, emb_dim=16, n_heads=2, n_kv_groups=1, n_layers=1,
                         hidden_dim=24)


def _write_gguf(path: Path) -> Path:
    """A valid llama GGUF of TINY_LLAMA, plus a uint8 metadata array (`test.bytes`) to lie about."""
    from gguf import GGUFValueType, GGUFWriter

    cfg = TINY_LLAMA
    torch.manual_seed(0)
    state = LlamaModel(cfg).state_dict()
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.n_layers)
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.emb_dim)
    writer.add_feed_forward_length(cfg.hidden_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_groups)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_layer_norm_rms_eps(cfg.rms_eps)
    writer.add_key_value("test.bytes", [1, 2, 3, 4], GGUFValueType.ARRAY, sub_type=GGUFValueType.UINT8)
    for ours, theirs in llama.GGUF_NAMES.items():
        if ours != "out_head.weight":  # tied
            writer.add_tensor(theirs.format(0), state[ours.format(0)].numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> tuple[bytes, dict[str, int], int]:
    """(bytes of a valid GGUF, byte offsets of the fields to corrupt, where the second tensor's info starts)."""
    from gguf import GGUFReader

    path = _write_gguf(tmp_path_factory.mktemp("gguf") / "ok.gguf")
    read_gguf(path)  # the control: the uncorrupted file loads
    reader = GGUFReader(path)
    fields = reader.fields

    def value_at(key: str) -> int:  # a scalar's value: after key length, key and type
        return fields[key].offset + 8 + len(key) + 4

    first, second = reader.tensors[0], reader.tensors[1]
    name_end = first.field.offset + 8 + len(first.name)
    offsets = {
        "tensor_count": fields["GGUF.tensor_count"].offset,
        "kv_count": fields["GGUF.kv_count"].offset,
        "array_length": value_at("test.bytes") + 4,  # after the array's item type
        "block_count": value_at("llama.block_count"),
        "first_dim": name_end + 4,
        "tensor_offset": name_end + 4 + 8 * len(first.shape) + 4,
        "second_offset": second.field.offset + 8 + len(second.name) + 4 + 8 * len(second.shape) + 4,
    }
    return path.read_bytes(), offsets, second.field.offset


def _corrupt(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


GGUF_LIES = {  # name: (field, struct format, value, what the error says)
    "metadata_array_of_2_to_the_40_elements": ("array_length", "<Q", 1 << 40, "claims 1,099,511,627,776 elements"),
    "tensor_count_of_2_to_the_60": ("tensor_count", "<Q", 1 << 60, "file ends at byte"),
    "kv_count_of_2_to_the_60": ("kv_count", "<Q", 1 << 60, "file ends at byte"),
    "tensor_dimension_of_2_to_the_40": ("first_dim", "<Q", 1 << 40, "file ends at byte"),
    "tensor_offset_beyond_the_file": ("tensor_offset", "<Q", 1 << 40, "file ends at byte"),
    "block_count_of_a_billion": ("block_count", "<I", 10**9, "n_layers must be <= 1,024"),
}


@pytest.mark.parametrize("lie", list(GGUF_LIES))
def test_absurd_gguf_is_a_clear_error_fast_and_in_bounded_memory(tmp_path, gguf_file, lie):
    data, offsets, _ = gguf_file
    field, fmt, value, says = GGUF_LIES[lie]
    path = tmp_path / "bad.gguf"
    path.write_bytes(_corrupt(data, offsets[field], fmt, value))
    with bounded(f"GGUF {lie}"), pytest.raises(CheckpointError, match=re.escape(says)):
        read_gguf(path)


def test_gguf_with_overlapping_tensors_is_refused(tmp_path, gguf_file):
    data, offsets, _ = gguf_file
    first_offset = struct.unpack_from("<Q", data, offsets["tensor_offset"])[0]
    path = tmp_path / "overlap.gguf"
    path.write_bytes(_corrupt(data, offsets["second_offset"], "<Q", first_offset))
    with bounded("GGUF overlapping tensors"), pytest.raises(CheckpointError, match="overlap"):
        read_gguf(path)


def test_gguf_with_a_truncated_tensor_table_is_a_clear_error(tmp_path, gguf_file):
    data, _, second_info = gguf_file
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: second_info + 5])  # inside the second tensor's name length
    with bounded("GGUF truncated tensor table"), pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_gguf(path)


# --- 4. config.json with absurd sizes, and paths leading out of the model directory ------------

def _hf_llama_dir(path: Path, emb_dim: int = 16, **hf_overrides) -> Path:
    """A Hugging Face llama directory (config.json + model.safetensors) of a tiny random model."""
    cfg = LlamaConfig(vocab_size=32, context_length=16, emb_dim=emb_dim, n_heads=2, n_kv_groups=1, n_layers=1,
                      hidden_dim=24)
    torch.manual_seed(0)
    state = LlamaModel(cfg).state_dict()
    path.mkdir(parents=True)
    tensors = {theirs.format(0): state[ours.format(0)].clone() for ours, theirs in llama.HF_NAMES.items()
               if ours != "out_head.weight"}
    save_file(tensors, path / "model.safetensors")
    config = {"model_type": "llama", "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.context_length,
              "hidden_size": cfg.emb_dim, "num_attention_heads": cfg.n_heads, "num_key_value_heads": 1,
              "num_hidden_layers": cfg.n_layers, "intermediate_size": cfg.hidden_dim, "tie_word_embeddings": True,
              **hf_overrides}
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def gpt2_checkpoint(tmp_path_factory) -> Path:
    """An llmclf checkpoint directory of a tiny GPT-2 (no tokenizer files)."""
    model = GPTModel(GPTConfig(vocab_size=64, context_length=16, emb_dim=16, n_heads=2, n_layers=1))
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", model)


def _edited_checkpoint(source: Path, target: Path, **model_values) -> Path:
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config["model"].update(model_values)
    (target / "config.json").write_text(json.dumps(config))
    return target


ABSURD_GPT_VALUES = {  # key: (value, what the error says)
    "n_layers_1e9_float": ("n_layers", 1e9, "n_layers must be an integer, got 1000000000.0"),
    "n_layers_a_billion": ("n_layers", 10**9, "n_layers must be <= 1,024"),
    "vocab_size_1e12": ("vocab_size", 10**12, "vocab_size must be <= 4,194,304"),
    "vocab_size_negative": ("vocab_size", -5, "vocab_size must be >= 1, got -5"),
    "emb_dim_a_float": ("emb_dim", 16.5, "emb_dim must be an integer, got 16.5"),
    "n_heads_a_string": ("n_heads", "2", "n_heads must be an integer, got '2'"),
    "qkv_bias_a_number": ("qkv_bias", 1, "qkv_bias must be true or false, got 1"),
    # Within the limits, but 4M x 16 floats = 256 MiB each for tok_emb and out_head that the weights lack:
    "vocab_size_beyond_the_weights": ("vocab_size", 4_000_000, "does not fit the model configuration"),
}


@pytest.mark.parametrize("case", list(ABSURD_GPT_VALUES))
def test_absurd_sizes_in_llmclf_config_json_are_refused_before_allocating(tmp_path, gpt2_checkpoint, case,
                                                                          gpt2_tokenizer_dir):
    key, value, says = ABSURD_GPT_VALUES[case]
    path = _edited_checkpoint(gpt2_checkpoint, tmp_path / "ckpt", **{key: value})
    with bounded(f"llmclf config.json {case}"), pytest.raises(CheckpointError, match=re.escape(says)):
        load_model(path, tokenizer_dir=gpt2_tokenizer_dir)


def test_tiny_checkpoint_and_hf_dir_controls_load(gpt2_checkpoint, gpt2_tokenizer_dir, tmp_path):
    """The controls: the unedited files of the tests above and below load."""
    load_model(gpt2_checkpoint, tokenizer_dir=gpt2_tokenizer_dir)
    _, cfg, _ = read_hf_dir(_hf_llama_dir(tmp_path / "hf"))
    assert cfg.n_layers == 1


ABSURD_HF_VALUES = {  # name: (config.json overrides, emb_dim, what the error says)
    "num_hidden_layers_1e9_float": ({"num_hidden_layers": 1e9}, 16, "n_layers must be an integer"),
    "num_hidden_layers_a_billion": ({"num_hidden_layers": 10**9}, 16, "n_layers must be <= 1,024"),
    "vocab_size_1e12": ({"vocab_size": 10**12}, 16, "vocab_size must be <= 4,194,304"),
    "hidden_size_negative": ({"hidden_size": -16}, 16, "emb_dim must be >= 1"),
    "intermediate_size_a_string": ({"intermediate_size": "24"}, 16, "hidden_dim must be an integer, got '24'"),
    "rms_norm_eps_a_string": ({"rms_norm_eps": "tiny"}, 16, "rms_eps must be a number"),
    # Within the limits, but rotary tables of 2M positions x 32 x 2 floats (512 MiB) for 30 KiB of weights:
    "context_of_two_million_positions": ({"max_position_embeddings": 2_000_000}, 64, "MiB of position tables"),
}


@pytest.mark.parametrize("case", list(ABSURD_HF_VALUES))
def test_absurd_sizes_in_hf_config_json_are_refused_before_allocating(tmp_path, case):
    overrides, emb_dim, says = ABSURD_HF_VALUES[case]
    path = _hf_llama_dir(tmp_path / "hf", emb_dim=emb_dim, **overrides)
    _write_hf_tokenizer(path)
    with bounded(f"HF config.json {case}"), pytest.raises(CheckpointError, match=re.escape(says)):
        load_model(path)


@pytest.mark.parametrize(("key", "value", "says"), [("num_hidden_layers", 10**9, "n_layers must be <= 1,024"),
                                                    ("sliding_window_pattern", 0, "modulo by zero")])
def test_gemma3_config_with_absurd_layer_values_is_refused_without_looping(tmp_path, key, value, says):
    """Gemma 3's default layer list has n_layers entries: it must not be built for 10**9."""
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "gemma3_text", "vocab_size": 32, "max_position_embeddings": 16, "hidden_size": 16,
        "num_attention_heads": 2, "num_hidden_layers": 2, "intermediate_size": 24, "head_dim": 8,
        "num_key_value_heads": 1, "sliding_window": 8, key: value}))
    with bounded(f"Gemma 3 config.json {key}={value}"), pytest.raises(CheckpointError, match=says):
        read_hf_dir(tmp_path)


def _write_hf_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<eos>": 1, "a": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))


@pytest.fixture
def outside(tmp_path) -> Path:
    """A valid safetensors file outside the model directory, which no loader may read."""
    outside_dir = tmp_path / "elsewhere"
    outside_dir.mkdir()
    save_file({"secret": torch.zeros(2)}, outside_dir / "secret.safetensors")
    return outside_dir / "secret.safetensors"


@pytest.fixture
def reads(monkeypatch) -> list[Path]:
    """Every weights file the Hugging Face loader reads."""
    import llmclf.loaders.hf_dir as hf_dir

    seen: list[Path] = []
    real = hf_dir.read_tensor_file
    monkeypatch.setattr(hf_dir, "read_tensor_file", lambda path: seen.append(Path(path)) or real(path))
    return seen


@pytest.mark.parametrize("shard", ["../elsewhere/secret.safetensors", "ABSOLUTE", "link.safetensors"])
def test_shard_index_naming_a_file_outside_the_model_directory_is_refused_before_reading(tmp_path, outside,
                                                                                         reads, shard):
    path = _hf_llama_dir(tmp_path / "hf")
    if shard == "ABSOLUTE":
        shard = str(outside)
    elif shard == "link.safetensors":
        (path / shard).symlink_to(outside)
    weight_map = {"model.embed_tokens.weight": "model.safetensors", "model.norm.weight": shard}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="outside the model directory"):
        read_hf_dir(path)
    assert reads == []  # not even the shard inside was read


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_symlink_out_of_an_llmclf_checkpoint_is_refused(tmp_path, gpt2_checkpoint, outside, name):
    path = shutil.copytree(gpt2_checkpoint, tmp_path / "ckpt")
    (path / name).unlink()
    (path / name).symlink_to(outside)
    with pytest.raises(CheckpointError, match=f"{name} is a symbolic link to .*outside the model directory"):
        load_model(path)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"])
def test_symlink_out_of_a_hf_directory_is_refused(tmp_path, outside, name):
    path = _hf_llama_dir(tmp_path / "hf")
    _write_hf_tokenizer(path)
    (path / name).unlink()
    (path / name).symlink_to(outside)
    with pytest.raises(CheckpointError, match=f"{name} is a symbolic link to .*outside the model directory"):
        load_model(path) if name != "tokenizer_config.json" else HFTokenizer.from_dir(path)


def test_symlink_out_of_an_encoder_directory_is_refused_before_transformers_reads_it(tmp_path, outside):
    from llmclf.engines.hf import load_sequence_classifier

    path = tmp_path / "bert"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (path / "model.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointError, match="model.safetensors is a symbolic link to .*outside the model directory"):
        load_sequence_classifier(str(path), labels=["a", "b"])


def test_gpt2_tokenizer_file_linked_out_of_the_model_directory_is_refused(tmp_path, gpt2_tokenizer_dir):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copy(gpt2_tokenizer_dir / "vocab.bpe", model_dir / "vocab.bpe")
    (model_dir / "encoder.json").symlink_to(gpt2_tokenizer_dir / "encoder.json")
    with pytest.raises(CheckpointError, match="encoder.json is a symbolic link"):
        load_gpt2_tokenizer(model_dir=model_dir)
    assert load_gpt2_tokenizer(tokenizer_dir=model_dir).vocab_size == 50257  # a directory the user names: allowed


def test_symlinks_inside_the_directory_and_into_a_hf_cache_blobs_folder_are_allowed(tmp_path):
    snapshot = tmp_path / "models--org--name" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (tmp_path / "models--org--name" / "blobs").mkdir()
    (tmp_path / "models--org--name" / "blobs" / "f00d").write_text("{}")
    (snapshot / "config.json").symlink_to(Path("..", "..", "blobs", "f00d"))
    assert model_file(snapshot, "config.json").read_text() == "{}"
    (snapshot / "alias.json").symlink_to(snapshot / "config.json")
    assert model_file(snapshot, "alias.json").is_file()
    (tmp_path / "models--org--name" / "secret").write_text("{}")  # in the repository folder, not in blobs/
    (snapshot / "secret.json").symlink_to(Path("..", "..", "secret"))
    with pytest.raises(CheckpointError, match="outside the model directory"):
        model_file(snapshot, "secret.json")


# --- 5. zips given to `data sms-spam --source` ----------------------------------------------------

def _sms_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name), data, zipfile.ZIP_DEFLATED)
    return path


SMS = b"ham\tOk lar...\nspam\tWIN a prize now\n" * 20


def _files_under(root: Path) -> set[Path]:
    return set(root.rglob("*"))


def _run_sms_spam(source: Path, out: Path):
    from typer.testing import CliRunner

    from llmclf.cli import app

    return CliRunner().invoke(app, ["data", "sms-spam", "--source", str(source), "--out", str(out)])


@pytest.mark.parametrize("evil", ["../evil.txt", "/tmp/llmclf-evil.txt", "ok/../../evil.txt", "..\\evil.txt"])
def test_zip_slip_member_is_refused_and_nothing_is_written(tmp_path, evil):
    target = tmp_path / "work"
    target.mkdir()
    source = _sms_zip(target / "sms.zip", {"SMSSpamCollection": SMS, evil: b"pwned"})
    before = _files_under(tmp_path)
    result = _run_sms_spam(source, target / "out")
    assert result.exit_code != 0 and isinstance(result.exception, DataError)
    assert "zip-slip" in str(result.exception) and repr(evil) in str(result.exception)
    assert _files_under(tmp_path) == before and not Path("/tmp/llmclf-evil.txt").exists()


def _zeros_member(path: Path, size: int) -> Path:
    """A zip whose SMSSpamCollection unpacks to `size` zero bytes (about size / 1000 on disk)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive, archive.open("SMSSpamCollection", "w") as f:
        block = bytes(1 << 20)
        for _ in range(size >> 20):
            f.write(block)
    return path


@pytest.fixture(scope="module")
def zip_bomb(tmp_path_factory) -> Path:
    """65 MiB of zeros in a 65 KiB zip: over the 64 MiB limit (the real file has 477 KB)."""
    return _zeros_member(tmp_path_factory.mktemp("bomb") / "bomb.zip", 65 << 20)


def test_zip_bomb_is_refused_before_unpacking(tmp_path, zip_bomb):
    from llmclf.data.classification import read_sms_spam

    assert zip_bomb.stat().st_size < 1 << 20
    with bounded("zip bomb (65 MiB member)", max_growth=32 << 20), pytest.raises(DataError, match="zip bomb"):
        read_sms_spam(zip_bomb)
    result = _run_sms_spam(zip_bomb, tmp_path / "out")
    assert result.exit_code != 0 and "zip bomb" in str(result.exception)
    assert not (tmp_path / "out").exists()


def test_zip_bomb_lying_about_its_size_stops_at_the_declared_size(tmp_path, zip_bomb):
    """A member that declares 1 KB but inflates to 65 MiB: zipfile stops at 1 KB and the CRC fails."""
    data = bytearray(zip_bomb.read_bytes())
    for signature, size_at in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # local header, central directory
        at = data.find(signature)
        struct.pack_into("<I", data, at + size_at, 1000)
    liar = tmp_path / "liar.zip"
    liar.write_bytes(bytes(data))
    from llmclf.data.classification import read_sms_spam

    with bounded("zip bomb declaring 1 KB", max_growth=32 << 20), pytest.raises(DataError, match="CRC"):
        read_sms_spam(liar)


def test_sms_zip_control_is_read(tmp_path):
    from llmclf.data.classification import read_sms_spam

    frame = read_sms_spam(_sms_zip(tmp_path / "ok.zip", {"SMSSpamCollection": SMS, "readme.txt": b"hi"}))
    assert len(frame) == 40 and set(frame["label"]) == {"ham", "spam"}
