"""The corpora a recipe can name (`data.format`), as Sources per split:

- `timit`: TIMIT's LDC layout (timit.py).
- `audiofolder`: audio files with a `metadata.csv` holding `file_name` and the transcript column
  (`data.text_column`), each split as a subfolder with its own metadata.csv (as datasets' audiofolder builder
  reads it), or one metadata.csv with a `split` column; decoded with soundfile.
- `disk`: a DatasetDict saved with `save_to_disk`, an `audio` column (an Audio feature, or
  {array, sampling_rate}) and the transcript column.
The splits are `data.train_split` and `data.eval_split` (default `train` and `test`: TIMIT's TRAIN/ and TEST/,
any case); internally they are called "train" and "test". A missing audio file is its utterance's problem
(reported with every other, see corpus.py), not the corpus's. Counting and the cheap check of headers and
transcripts (`cheap_problems`, for preflight) read no audio samples and import no torch.
"""

from __future__ import annotations

import csv
import functools
import json
from pathlib import Path
from typing import Any

import numpy as np

from asrlaunch.core.recipe import DataSection
from asrlaunch.data.corpus import (
    DataError,
    Problem,
    Source,
    decode,
    file_stamp,
    text_problems,
)
from asrlaunch.data.text import transcript
from asrlaunch.data.timit import scan_split, timit_sources

METADATA = "metadata.csv"


def split_names(data: DataSection) -> dict[str, str]:
    """The corpus's own name of each role's split."""
    return {"train": data.train_split, "test": data.eval_split}


# -- audiofolder ---------------------------------------------------------------------------------------------
def metadata_rows(root: Path, text_column: str, names: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    """The rows of each split's metadata.csv (the columns checked), with the folder their files are in."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: the audiofolder does not exist (set data.dir)")
    per_split = {role: root / name / METADATA for role, name in names.items()}
    if all(path.exists() for path in per_split.values()):
        return {role: read_metadata(path, text_column) for role, path in per_split.items()}
    single = root / METADATA
    if not single.exists():
        folders = " and ".join(f"{name}/" for name in names.values())
        raise DataError(
            f"{root}: no {METADATA} in {folders}, nor one with a `split` column (data.train_split, "
            "data.eval_split name the splits)"
        )
    rows = read_metadata(single, text_column, needs_split=True)
    return {role: [r for r in rows if r["split"] == name] for role, name in names.items()}


def read_metadata(path: Path, text_column: str, needs_split: bool = False) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as file:  # -sig: a spreadsheet's byte-order mark
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
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8"
        ) from None
    for number, row in enumerate(rows, start=2):
        row["_folder"], row["_where"] = str(path.parent), f"{path}:{number}"
    return rows


def audiofolder_sources(root: Path, text_column: str, names: dict[str, str]) -> dict[str, list[Source]]:
    """The audiofolder layout read from its metadata (datasets 5's audiofolder builder encodes every file
    through torchcodec, which has no working CPU build here; the layout and its conventions are the same)."""
    splits = {}
    for role, rows in metadata_rows(root, text_column, names).items():
        splits[role] = [_row_source(row, root, text_column) for row in rows]
        if not splits[role]:
            raise DataError(f"{root}: the {names[role]} split holds no utterance")
    return splits


def _row_source(row: dict[str, str], root: Path, text_column: str) -> Source:
    path = Path(row["_folder"]) / (row["file_name"] or "")
    inside = path.relative_to(root) if path.is_relative_to(root) else path  # an absolute file_name: anywhere
    ident = str(inside.with_suffix(""))
    problem = (
        None
        if path.is_file()
        else f"the file does not exist ({row['_where']}, file_name {row['file_name']!r})"
    )
    text = row[text_column]
    if text is None:  # csv leaves the missing cells of a short row None
        problem = f"no transcript: the row has fewer cells than the header ({row['_where']})"
    read = functools.partial(decode, path, str(path))
    return Source(ident, text or "", str(path), read, file_stamp(path), path, problem)


# -- a dataset saved to disk ---------------------------------------------------------------------------------
def one_dataset(root: Path, names: dict[str, str]) -> DataError:
    wanted = " and ".join(repr(split) for split in names.values())
    return DataError(f"{root}: one Dataset, not a DatasetDict; save its {wanted} splits as a DatasetDict")


def disk_sources(root: Path, text_column: str, names: dict[str, str]) -> dict[str, list[Source]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(root))
    except FileNotFoundError:
        raise DataError(f"{root}: not a dataset saved with save_to_disk (no dataset_dict.json)") from None
    if not isinstance(loaded, datasets.DatasetDict):
        raise one_dataset(root, names)
    splits = {}
    for role, split in names.items():
        if split not in loaded:
            raise DataError(
                f"{root}: no {split!r} split (it has: {', '.join(loaded)}; see data.{role}_split)"
            )
        table = loaded[split]
        for column in ("audio", text_column):
            if column not in table.column_names:
                raise DataError(
                    f"{root} [{split}]: no column {column!r} (columns: {', '.join(table.column_names)})"
                )
        # Not the folder: a copied dataset is the same corpus. datasets' fingerprint follows the transforms
        # (two map()s of one function with other settings share it), so its Arrow files' stamps join it.
        files = [file_stamp(Path(cached["filename"])) for cached in table.cache_files]
        stamp = "\0".join([split, table._fingerprint, *files])
        if isinstance(table.features["audio"], datasets.Audio):
            table = table.cast_column("audio", datasets.Audio(decode=False))
        splits[role] = _disk_split(table, text_column, f"{root} [{split}]", stamp)
    return splits


def _disk_split(table: Any, text_column: str, name: str, stamp: str) -> list[Source]:
    """A split's sources from its columns: the audio stays in the memory-mapped table until an utterance is
    read (every rank lists the sources at every start; holding the audio would cost the corpus's size
    each)."""
    ids = list(table["id"]) if "id" in table.column_names else []
    unique = len(set(ids)) == len(ids)  # timit_asr's ids name sentences (SA1), which many speakers read
    sources = []
    for index, (text, path) in enumerate(zip(table[text_column], _audio_paths(table), strict=True)):
        ident = (str(ids[index]) if unique else f"{ids[index]}@{index}") if ids else str(index)
        where = f"{name} row {index}"
        problem = None if text is not None else f"no transcript ({text_column} is null)"
        read = functools.partial(_read_row, table, index, where)
        sources.append(Source(ident, str(text or ""), where, read, f"{stamp}\0{index}", path, problem))
    return sources


def _audio_paths(table: Any) -> list[Path | None]:
    """Each row's audio file where the audio is stored as a path alone (for the cheap header check), read from
    the Arrow columns without the audio bytes."""
    column = table.data.column("audio")
    names = {field.name for field in column.type} if hasattr(column.type, "num_fields") else set()
    if not {"bytes", "path"} <= names:
        return [None] * len(table)
    paths: list[Path | None] = []
    for chunk in column.chunks:
        bare = chunk.field("bytes").is_null().to_pylist()
        paths += [
            Path(p) if p and b else None for p, b in zip(chunk.field("path").to_pylist(), bare, strict=True)
        ]
    return paths


def _read_row(table: Any, index: int, where: str) -> tuple[np.ndarray, int]:
    audio = table[index]["audio"]
    if "array" in audio:  # stored as samples
        return np.asarray(audio["array"], dtype=np.float32), int(audio["sampling_rate"])
    return decode(audio.get("bytes") or Path(audio["path"]), where)


def corpus_sources(data: DataSection) -> dict[str, list[Source]]:
    """Every split's sources as the recipe names them, cut to data.max_{train,eval}_samples."""
    root, names = Path(data.dir), split_names(data)
    if data.format == "timit":
        splits = {role: timit_sources(root, name) for role, name in names.items()}
    elif data.format == "audiofolder":
        splits = audiofolder_sources(root, data.text_column, names)
    else:
        splits = disk_sources(root, data.text_column, names)
    return {
        "train": splits["train"][: data.max_train_samples],
        "test": splits["test"][: data.max_eval_samples],
    }


def cheap_problems(data: DataSection) -> list[Problem]:
    """What can be found without decoding audio: layout defects (no transcript, a missing file), empty
    transcripts after normalisation, and audio headers that are unreadable or have no samples."""
    import soundfile

    problems = []
    for role, sources in corpus_sources(data).items():
        texts = [transcript(s.text, data.text_normalization) for s in sources]
        found = text_problems(role, sources, texts, data.text_normalization)
        problems += found
        flagged = {(p.id, p.where) for p in found}  # not by id alone: a.wav and a.flac share one
        for source in sources:
            if source.path is None or (source.id, source.where) in flagged:
                continue
            try:
                info = soundfile.info(str(source.path))
            except Exception as error:  # soundfile raises its own LibsndfileError, RuntimeError or OSError
                problems.append(Problem(role, source.id, source.where, f"unreadable audio ({error})"))
                continue
            if info.frames == 0:
                problems.append(Problem(role, source.id, source.where, "no samples"))
    return problems


def count_utterances(data: DataSection) -> dict[str, int]:
    """Utterances per split from the layout or metadata alone (no audio read, no torch)."""
    root, names = Path(data.dir), split_names(data)
    if data.format == "timit":
        return {role: len(scan_split(root, name)) for role, name in names.items()}
    if data.format == "audiofolder":
        return {role: len(rows) for role, rows in metadata_rows(root, data.text_column, names).items()}
    index = root / "dataset_dict.json"
    if not index.exists() and (root / "state.json").exists():  # what save_to_disk writes for one Dataset
        raise one_dataset(root, names)
    if not index.exists():
        raise DataError(f"{root}: not a dataset saved with save_to_disk (no dataset_dict.json)")
    counts = {}
    for role, split in names.items():
        state = root / split / "state.json"
        if not state.exists():
            raise DataError(f"{root}: no {split!r} split (see {index}; data.{role}_split)")
        files = json.loads(state.read_text()).get("_data_files", [])
        counts[role] = sum(_arrow_rows(root / split / f["filename"]) for f in files)
    return counts


def _arrow_rows(path: Path) -> int:
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        return int(pa.ipc.open_stream(source).read_all().num_rows)
