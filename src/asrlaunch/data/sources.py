"""The corpora a recipe can name (`data.format`), as Sources per split:

- `timit`: TIMIT's LDC layout (timit.py).
- `audiofolder`: audio files with a `metadata.csv` holding `file_name` and the transcript column
  (`data.text_column`), train/test as subfolders (each with its metadata.csv) or one metadata.csv with a
  `split` column (the conventions of datasets' audiofolder builder), decoded with soundfile.
- `disk`: a DatasetDict saved with `save_to_disk`, with `train` and `test` splits, an `audio` column (an Audio
  feature, or {array, sampling_rate}) and the transcript column.

Checking a corpus (`count_utterances`, for preflight) reads metadata only and imports no torch.
"""

from __future__ import annotations

import csv
import functools
import json
from pathlib import Path
from typing import Any

import numpy as np

from asrlaunch.data.corpus import DataError, Source, decode, file_stamp
from asrlaunch.data.timit import scan_split, timit_sources
from asrlaunch.core.recipe import DataSection

METADATA = "metadata.csv"
SPLITS = ("train", "test")


# -- audiofolder ---------------------------------------------------------------------------------------------
def metadata_rows(root: Path, text_column: str) -> dict[str, list[dict[str, str]]]:
    """The rows of each split's metadata.csv, checked: the columns are there and every file exists."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: the audiofolder does not exist (set data.dir)")
    per_split = {split: root / split / METADATA for split in SPLITS}
    if not all(path.exists() for path in per_split.values()):
        single = root / METADATA
        if not single.exists():
            raise DataError(f"{root}: no {METADATA} (in train/ and test/, or one with a `split` column)")
        rows = read_metadata(single, text_column, needs_split=True)
        return {split: [r for r in rows if r["split"] == split] for split in SPLITS}
    return {split: read_metadata(path, text_column) for split, path in per_split.items()}


def read_metadata(path: Path, text_column: str, needs_split: bool = False) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        columns = reader.fieldnames or []
        required = ["file_name", text_column, *(["split"] if needs_split else [])]
        for column in required:
            if column not in columns:
                raise DataError(
                    f"{path}: no column {column!r} (columns: {', '.join(columns) or 'none'}); "
                    f"the transcript column is data.text_column"
                )
        rows = list(reader)
    for number, row in enumerate(rows, start=2):
        if not (path.parent / row["file_name"]).is_file():
            raise DataError(f"{path}:{number}: file_name {row['file_name']!r} does not exist beside it")
    return rows


def audiofolder_sources(root: Path, text_column: str) -> dict[str, list[Source]]:
    """The audiofolder layout read from its metadata (datasets 5's audiofolder builder encodes every file
    through torchcodec, which has no working CPU build here; the layout and its conventions are the same)."""
    splits = {}
    for split, rows in metadata_rows(root, text_column).items():
        folder = root / split if (root / split / METADATA).exists() else root
        splits[split] = [_row_source(folder / row["file_name"], root, row[text_column]) for row in rows]
        if not splits[split]:
            raise DataError(f"{root}: the {split} split holds no utterance")
    return splits


def _row_source(path: Path, root: Path, text: str) -> Source:
    ident = str(path.relative_to(root).with_suffix(""))
    read = functools.partial(decode, path, str(path))
    return Source(ident, text, str(path), read, file_stamp(path))


# -- a dataset saved to disk ---------------------------------------------------------------------------------
def disk_sources(root: Path, text_column: str) -> dict[str, list[Source]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(root))
    except FileNotFoundError:
        raise DataError(f"{root}: not a dataset saved with save_to_disk (no dataset_dict.json)") from None
    splits = {}
    for split in SPLITS:
        if split not in loaded:
            raise DataError(f"{root}: no {split!r} split (it has: {', '.join(loaded)})")
        table = loaded[split]
        for column in ("audio", text_column):
            if column not in table.column_names:
                raise DataError(
                    f"{root} [{split}]: no column {column!r} (columns: {', '.join(table.column_names)})"
                )
        if isinstance(table.features["audio"], datasets.Audio):
            table = table.cast_column("audio", datasets.Audio(decode=False))
        stamp = f"{root}\0{split}\0{table._fingerprint}"
        splits[split] = [_disk_source(row, index, text_column, f"{root} [{split}] row {index}", stamp)
                         for index, row in enumerate(table)]
    return splits


def _disk_source(row: dict[str, Any], index: int, text_column: str, where: str, stamp: str) -> Source:
    audio = row["audio"]
    ident = str(row.get("id") or index)
    if "array" in audio:  # stored as samples
        samples, rate = np.asarray(audio["array"], dtype=np.float32), int(audio["sampling_rate"])
        stored = functools.partial(_samples, samples, rate)
        return Source(ident, str(row[text_column]), where, stored, f"{stamp}\0{index}")
    data = audio.get("bytes") or Path(audio["path"])
    read = functools.partial(decode, data, where)
    return Source(ident, str(row[text_column]), where, read, f"{stamp}\0{index}")


def _samples(samples: np.ndarray, rate: int) -> tuple[np.ndarray, int]:
    return samples, rate


def corpus_sources(data: DataSection) -> dict[str, list[Source]]:
    """Every split's sources as the recipe names them, cut to data.max_{train,eval}_samples."""
    root = Path(data.dir)
    if data.format == "timit":
        splits = {split: timit_sources(root, split) for split in SPLITS}
    elif data.format == "audiofolder":
        splits = audiofolder_sources(root, data.text_column)
    else:
        splits = disk_sources(root, data.text_column)
    return {"train": splits["train"][: data.max_train_samples], "test": splits["test"][: data.max_eval_samples]}


def count_utterances(data: DataSection) -> dict[str, int]:
    """Utterances per split from the layout or metadata alone (no audio read, no torch)."""
    root = Path(data.dir)
    if data.format == "timit":
        return {split: len(scan_split(root, split)) for split in SPLITS}
    if data.format == "audiofolder":
        return {split: len(rows) for split, rows in metadata_rows(root, data.text_column).items()}
    index = root / "dataset_dict.json"
    if not index.exists():
        raise DataError(f"{root}: not a dataset saved with save_to_disk (no dataset_dict.json)")
    counts = {}
    for split in SPLITS:
        state = root / split / "state.json"
        if not state.exists():
            raise DataError(f"{root}: no {split!r} split (see {index})")
        files = json.loads(state.read_text()).get("_data_files", [])
        counts[split] = sum(_arrow_rows(root / split / f["filename"]) for f in files)
    return counts


def _arrow_rows(path: Path) -> int:
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        return int(pa.ipc.open_stream(source).read_all().num_rows)
