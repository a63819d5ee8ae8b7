"""Labelled text data: read CSV/TSV/JSONL, split, tokenise and batch with dynamic padding."""

from __future__ import annotations

import csv
import os
import random
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from llmclf.errors import DataError
from llmclf.loaders.tensors import atomic_path


@dataclass
class LabelledTexts:
    texts: list[str]
    labels: list[str]
    source: str = ""

    def __len__(self) -> int:
        return len(self.texts)


def _read_frame(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json", ".ndjson"):
            return pd.read_json(path, lines=suffix != ".json", dtype=False)
        sep = "\t" if suffix in (".tsv", ".tab") else ","
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path} as {suffix.lstrip('.') or 'CSV'}: {exc}") from exc


def read_labelled(path: str | os.PathLike, text_col: str = "text", label_col: str | None = "label") -> LabelledTexts:
    """Texts and labels (as strings) from a CSV, TSV or JSONL file with a header.

    `label_col=None` reads texts only (for prediction). Empty texts and missing labels are errors
    that name the row.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    frame = _read_frame(path)
    columns = [text_col] + ([label_col] if label_col else [])
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{path} has no column {missing[0]!r} (columns: {', '.join(map(str, frame.columns))}); "
                        "choose others with --text-col / --label-col")
    if frame.empty:
        raise DataError(f"{path} has no rows")
    texts = frame[text_col].astype(str).tolist()
    labels = frame[label_col].astype(str).str.strip().tolist() if label_col else []
    for i, text in enumerate(texts):
        if not text.strip():
            raise DataError(f"{path}, row {i + 2}: the text is empty")
    for i, label in enumerate(labels):
        if label in ("", "nan", "None"):
            raise DataError(f"{path}, row {i + 2}: the label is missing")
    return LabelledTexts(texts, labels, str(path))


def label_order(labels: list[str]) -> list[str]:
    """Class names in a fixed order: numerically if all are integers, else alphabetically."""
    unique = set(labels)
    try:
        return sorted(unique, key=int)
    except ValueError:
        return sorted(unique)


def write_labelled(data: LabelledTexts, path: str | os.PathLike) -> None:
    """A `text,label` CSV, written atomically."""
    with atomic_path(path) as tmp:
        pd.DataFrame({"text": data.texts, "label": data.labels}).to_csv(tmp, index=False)


def parse_label_names(spec: str) -> dict[str, str]:
    """`"0=negative,1=positive"` -> {"0": "negative", "1": "positive"}."""
    names: dict[str, str] = {}
    for item in spec.split(","):
        old, sep, new = (part.strip() for part in item.partition("="))
        if not sep or not old or not new or old in names:
            raise DataError(f"label names must be OLD=NEW pairs, each OLD once, separated by commas "
                            f"(e.g. 0=negative,1=positive); got {spec!r}")
        names[old] = new
    return names


def rename_labels(data: LabelledTexts, names: dict[str, str]) -> LabelledTexts:
    """The same texts with every label replaced by its name; a label without a name is an error."""
    missing = sorted(set(data.labels) - set(names))
    if missing:
        raise DataError(f"{data.source} has label(s) {', '.join(map(repr, missing))} without a name; "
                        f"give every label one (given: {', '.join(names)})")
    return LabelledTexts(data.texts, [names[label] for label in data.labels], data.source)


def split_labelled(data: LabelledTexts, ratios: tuple[float, float, float] = (0.7, 0.1, 0.2),
                   stratify: bool = False, seed: int = 123) -> tuple[LabelledTexts, LabelledTexts, LabelledTexts]:
    """Shuffle and split into train/validation/test by `ratios` (optionally stratified by label).
    A share of 0 gives an empty part: `(0.8, 0.2, 0)` is the usual 80/20 train/evaluation split,
    identical to scikit-learn's `train_test_split(test_size=0.2, random_state=seed)`."""
    from sklearn.model_selection import train_test_split  # slow to import: only when splitting

    if len(ratios) != 3 or any(r < 0 for r in ratios) or abs(sum(ratios) - 1) > 1e-6:
        raise DataError(f"ratios must be three non-negative numbers summing to 1, got {ratios}")
    index = list(range(len(data)))
    n_test = round(len(index) * ratios[2])
    n_val = round(len(index) * ratios[1])
    if (ratios[2] > 0 and n_test == 0) or (ratios[1] > 0 and n_val == 0) or len(index) - n_test - n_val <= 0:
        raise DataError(f"{len(index)} rows are too few for the split {ratios}")

    def split(ids: list[int], n: int) -> tuple[list[int], list[int]]:
        if n == 0:
            return ids, []
        strat = [data.labels[i] for i in ids] if stratify else None
        return train_test_split(ids, test_size=n, random_state=seed, stratify=strat)

    try:
        rest, test = split(index, n_test)
        train, val = split(rest, n_val)
    except ValueError as exc:
        raise DataError(f"cannot split {data.source}: {exc}") from exc

    def subset(ids: list[int]) -> LabelledTexts:
        return LabelledTexts([data.texts[i] for i in ids], [data.labels[i] for i in ids], data.source)

    return subset(train), subset(val), subset(test)


# --- the UCI SMS Spam Collection, split as the course splits it -----------------------------------

SMS_SPAM_URLS = (
    "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",  # the course's address
    "https://f001.backblazeb2.com/file/LLMs-from-scratch/sms%2Bspam%2Bcollection.zip",  # its fallback
)
SMS_SPAM_ZIP_SHA256 = "1587ea43e58e82b14ff1f5425c88e17f8496bfcdb67a583dbff9eefaf9963ce3"


def read_sms_spam(source: str | os.PathLike) -> pd.DataFrame:
    """All 5,574 messages (`label`, `text`) of the raw file or the original zip.

    Read with quoting off: a message that starts with a double quote would otherwise swallow
    the next lines (pandas' default reads only 5,572 rows).
    """
    import zipfile

    path = Path(source)
    if not path.is_file():
        raise DataError(f"SMS spam source not found: {path}")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if "SMSSpamCollection" not in archive.namelist():
                raise DataError(f"{path} has no SMSSpamCollection file")
            raw = archive.read("SMSSpamCollection").decode("utf-8")
    else:
        raw = path.read_text(encoding="utf-8")
    rows = list(csv.reader(raw.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE))
    bad = [i + 1 for i, row in enumerate(rows) if len(row) != 2 or row[0] not in ("ham", "spam")]
    if bad:
        raise DataError(f"{path}: line {bad[0]} is not 'ham|spam<TAB>text' ({len(bad)} bad line(s))")
    return pd.DataFrame(rows, columns=["label", "text"])


def download_sms_spam(cache_dir: str | os.PathLike) -> Path:
    """The UCI archive, downloaded once (course address, then fallback) and checked by sha256."""
    import hashlib
    import urllib.request

    target = Path(cache_dir) / "sms_spam_collection.zip"
    if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == SMS_SPAM_ZIP_SHA256:
        return target
    errors = []
    for url in SMS_SPAM_URLS:
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                data = response.read()
        except OSError as exc:
            errors.append(f"{url}: {exc}")
            continue
        if hashlib.sha256(data).hexdigest() != SMS_SPAM_ZIP_SHA256:
            errors.append(f"{url}: sha256 mismatch")
            continue
        with atomic_path(target) as tmp:
            tmp.write_bytes(data)
        return target
    raise DataError("could not download the SMS Spam Collection (" + "; ".join(errors) + "). "
                    "Pass --source with a local SMSSpamCollection file or its zip")


def course_split(frame: pd.DataFrame, balance: bool = True, seed: int = 123,
                 train_frac: float = 0.7, validation_frac: float = 0.1) -> tuple[pd.DataFrame, ...]:
    """The course's `create_balanced_dataset` + `random_split` (pandas sampling, same seeds)."""
    if balance:
        spam = frame[frame["label"] == "spam"]
        ham = frame[frame["label"] == "ham"].sample(len(spam), random_state=seed)
        frame = pd.concat([ham, spam])
    frame = frame.sample(frac=1, random_state=seed).reset_index(drop=True)
    train_end = int(len(frame) * train_frac)
    validation_end = train_end + int(len(frame) * validation_frac)
    return frame[:train_end], frame[train_end:validation_end], frame[validation_end:]


def prepare_sms_spam(out_dir: str | os.PathLike, source: str | os.PathLike | None = None, seed: int = 123,
                     balance: bool = True, cache_dir: str | os.PathLike | None = None) -> dict[str, dict[str, int]]:
    """Write train/validation/test CSVs (`text,label`) of the SMS spam data; returns counts per split."""
    if source is None or str(source).startswith(("http://", "https://")):
        cache = Path(cache_dir or Path.home() / ".cache" / "llmclf")
        source = download_sms_spam(cache) if source is None else _download_url(str(source), cache)
    frame = read_sms_spam(source)
    counts = {}
    out_dir = Path(out_dir)
    for name, part in zip(("train", "validation", "test"), course_split(frame, balance, seed), strict=True):
        write_labelled(LabelledTexts(part["text"].tolist(), part["label"].tolist()), out_dir / f"{name}.csv")
        counts[name] = {"rows": len(part), **part["label"].value_counts().sort_index().to_dict()}
    return counts


def _download_url(url: str, cache: Path) -> Path:
    import urllib.request

    target = cache / Path(url).name
    try:
        with urllib.request.urlopen(url, timeout=60) as response, atomic_path(target) as tmp:
            tmp.write_bytes(response.read())
    except OSError as exc:
        raise DataError(f"could not download {url}: {exc}") from exc
    return target


# --- tokenised batches --------------------------------------------------------------------------

@dataclass
class EncodedTexts:
    ids: list[list[int]]
    labels: list[int] | None
    truncated: int  # how many texts were cut to max_length


TEXT_FIELD = "{text}"


def apply_template(template: str | None, texts: list[str]) -> list[str]:
    """Each text put where `{text}` stands in `template` (None: the texts unchanged)."""
    if template is None:
        return texts
    return [template.replace(TEXT_FIELD, text) for text in texts]


LABELS_FIELD = "{labels}"
AUTO_TEMPLATE = "auto"
# What `--template auto` asks, inside the backbone's chat format when it has one.
DEFAULT_INSTRUCTION = "Classify the following text as one of: {labels}.\n\n{text}"


def template_problem(template: str | None) -> str | None:
    """What is wrong with a template (None if nothing is)."""
    if template is not None and template != AUTO_TEMPLATE and TEXT_FIELD not in template:
        return f"template must contain {TEXT_FIELD} where the text goes (or be {AUTO_TEMPLATE!r}), got {template!r}"
    return None


def resolve_template(template: str | None, chat_template: str | None, labels: list[str]) -> str | None:
    """The template a model reads: `auto` is `DEFAULT_INSTRUCTION` inside `chat_template` (one user
    turn with "{prompt}"; None: the bare instruction); `{labels}` becomes the class names."""
    if template == AUTO_TEMPLATE:
        template = DEFAULT_INSTRUCTION if chat_template is None else chat_template.replace("{prompt}",
                                                                                            DEFAULT_INSTRUCTION)
    if template is None:
        return None
    return template.replace(LABELS_FIELD, ", ".join(labels))


def encode_texts(texts: list[str], tokenizer, max_length: int, label_ids: list[int] | None = None,
                 token_ids: list[list[int]] | None = None, keep_last: int = 0) -> EncodedTexts:
    """Token ids cut to `max_length` (pass `token_ids` when the texts are already tokenised). A text
    that is too long loses tokens before its last `keep_last` (a template's end, e.g. the chat
    format's assistant turn that the last-token pooling reads), not those."""
    encoded = token_ids if token_ids is not None else tokenizer.encode_batch(texts)
    truncated = sum(len(ids) > max_length for ids in encoded)
    keep_last = min(keep_last, max_length // 2)
    encoded = [(ids if len(ids) <= max_length else ids[:max_length - keep_last] + ids[len(ids) - keep_last:])
               or [tokenizer.pad_id] for ids in encoded]
    return EncodedTexts(encoded, label_ids, truncated)


def template_suffix_tokens(template: str | None, tokenizer) -> int:
    """How many tokens a template puts after the text (kept when long texts are cut)."""
    if template is None or template.endswith(TEXT_FIELD):
        return 0
    suffix = template.split(TEXT_FIELD)[-1]
    return len(tokenizer.encode(suffix)) - (tokenizer.bos_id is not None)


def collate(ids: list[list[int]], pad_id: int, fixed_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence (or to `fixed_length`); returns (input_ids, attention_mask)."""
    length = fixed_length or max(len(x) for x in ids)
    input_ids = torch.full((len(ids), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), length), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    return input_ids, attention_mask


def batch_order(lengths: list[int], batch_size: int, shuffle: bool, bucket: bool,
                rng: random.Random) -> list[list[int]]:
    """Indices grouped into batches. With `bucket`, texts of similar length share a batch (less
    padding): shuffled indices are sorted by length within windows of 50 batches, and the
    batches themselves are shuffled."""
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    if bucket:
        window = batch_size * 50
        order = [i for start in range(0, len(order), window)
                 for i in sorted(order[start:start + window], key=lambda j: lengths[j])]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if bucket and shuffle:
        rng.shuffle(batches)
    return batches
