"""TIMIT in its LDC layout: {TRAIN,TEST}/DR1..DR8/<SPEAKER>/<UTT>.{WAV,TXT}, upper- or lower-case names;
audio as NIST SPHERE (the original) or RIFF WAV (some copies add `SA1.WAV.wav` beside `SA1.WAV`; the original
wins). Scanning needs no heavy import; preparing is corpus.py's, shared with the other formats.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from asrlaunch.data.corpus import (
    SPLITS,
    DataError,
    PreparedCorpus,
    Source,
    decode,
    file_stamp,
    prepare,
    read_audio,
)
from asrlaunch.data.text import Normalization

__all__ = [
    "DataError",
    "PreparedCorpus",
    "Utterance",
    "load_corpus",
    "read_audio",
    "scan_split",
    "timit_sources",
]


@dataclass(frozen=True)
class Utterance:
    id: str
    speaker: str
    audio: Path
    transcript: Path | None  # None: there is no .TXT beside the audio


def read_transcript(path: Path) -> str:
    """A .TXT line is `<start sample> <end sample> <sentence>`; the offsets are dropped and the words joined
    by single spaces, as the `timit_asr` dataset the reference run used reads them."""
    try:
        first_line = (path.read_text(errors="replace").splitlines() or [""])[0]
    except OSError as error:
        raise DataError(f"{path}: cannot read transcript ({error.strerror})") from None
    fields = first_line.split()
    if len(fields) < 3 or not (fields[0].isdigit() and fields[1].isdigit()):
        raise DataError(f"{path}: expected '<start> <end> <sentence>', got {' '.join(fields)!r}")
    return " ".join(fields[2:])


def _child(folder: Path, name: str) -> Path | None:
    """The entry of `folder` called `name`, ignoring case."""
    for entry in folder.iterdir():
        if entry.name.lower() == name.lower():
            return entry
    return None


def _utterances_of_speaker(speaker: Path) -> Iterator[Utterance]:
    files = {entry.name.lower(): entry for entry in speaker.iterdir() if entry.is_file()}
    audio_names = sorted(n for n in files if n.endswith(".wav") and not n.endswith(".wav.wav"))
    riff_only = sorted(n[: -len(".wav")] for n in files if n.endswith(".wav.wav") and n[:-4] not in files)
    for name in audio_names + riff_only:
        stem = name[: -len(".wav")]
        audio = files.get(name) or files[name + ".wav"]
        transcript = files.get(stem + ".txt")
        yield Utterance(f"{speaker.name.upper()}_{stem.upper()}", speaker.name.upper(), audio, transcript)


def scan_split(root: str | Path, split: str) -> list[Utterance]:
    """All utterances of one split (`train` or `test`), in a stable order."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: the TIMIT folder does not exist (set data.dir to your copy of TIMIT)")
    folder = _child(root, split)
    if folder is None or not folder.is_dir():
        raise DataError(f"{root}: no {split.upper()}/ folder (expected TIMIT's TRAIN/ and TEST/ layout)")
    utterances = [
        utterance
        for region in sorted(p for p in folder.iterdir() if p.is_dir())
        for speaker in sorted(p for p in region.iterdir() if p.is_dir())
        for utterance in _utterances_of_speaker(speaker)
    ]
    if not utterances:
        raise DataError(f"{folder}: the {split} split holds no utterance (DR*/<SPEAKER>/<UTT>.WAV)")
    return utterances


def timit_sources(root: str | Path, split: str) -> list[Source]:
    return [_source(u) for u in scan_split(root, split)]


def _source(utterance: Utterance) -> Source:
    """An utterance as a Source; a missing or malformed transcript is its problem, reported with the
    others."""
    audio, text, problem = utterance.audio, "", None
    if utterance.transcript is None:
        problem = f"no transcript {audio.stem.upper()}.TXT beside it"
    else:
        try:
            text = read_transcript(utterance.transcript)
        except DataError as error:
            problem = str(error)
    stamps = [file_stamp(audio), *([file_stamp(utterance.transcript)] if utterance.transcript else [])]
    read = functools.partial(decode, audio, str(audio))
    return Source(utterance.id, text, str(audio), read, "\0".join(stamps), audio, problem)


def load_corpus(
    root: str | Path,
    cache_dir: str | Path,
    max_train: int | None = None,
    max_test: int | None = None,
    normalization: Normalization = "clean",
) -> PreparedCorpus:
    """A TIMIT-layout corpus, prepared (see corpus.prepare); the vocabulary spans both splits."""
    limits = {"train": max_train, "test": max_test}
    splits = {split: timit_sources(root, split)[: limits[split]] for split in SPLITS}
    return prepare(splits, cache_dir, normalization)
