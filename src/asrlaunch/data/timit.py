"""TIMIT in its LDC layout -> prepared tables (normalised audio, labels, lengths), cached as Arrow.

Layout: {TRAIN,TEST}/DR1..DR8/<SPEAKER>/<UTT>.{WAV,TXT}, upper- or lower-case names; audio as NIST SPHERE
(the original) or RIFF WAV (some copies add `SA1.WAV.wav` beside `SA1.WAV`; the original wins).
Scanning needs no heavy import; preparing uses soundfile, transformers and datasets (imported lazily).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import datasets
    from transformers import Wav2Vec2Processor

from asrlaunch.data.text import (
    PAD,
    UNK,
    WORD_DELIMITER,
    Normalization,
    Transcript,
    build_vocab,
    transcript,
)

SAMPLE_RATE = 16000
SPLITS = ("train", "test")
CACHE_FORMAT = 2  # bump when the prepared table changes shape


class DataError(ValueError):
    """The corpus is unusable; the message names the file or folder to fix."""


@dataclass(frozen=True)
class Utterance:
    id: str
    speaker: str
    audio: Path
    transcript: Path


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
        if transcript is None:
            raise DataError(f"{audio}: no transcript {stem.upper()}.TXT beside it")
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


def read_audio(path: Path) -> np.ndarray:
    import soundfile

    try:
        audio, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except Exception as error:  # soundfile raises its own LibsndfileError, RuntimeError or OSError
        raise DataError(f"{path}: unreadable audio ({error})") from None
    if rate != SAMPLE_RATE:
        raise DataError(f"{path}: sample rate {rate} Hz, expected {SAMPLE_RATE} Hz (resample the corpus)")
    if audio.shape[1] != 1:
        raise DataError(f"{path}: {audio.shape[1]} channels, expected mono")
    if audio.shape[0] == 0:
        raise DataError(f"{path}: no samples")
    return audio[:, 0]


def write_atomic(path: Path, text: str) -> None:
    """Ranks that write the same file at once must not tear it: write a private file, then rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def make_processor(vocab: dict[str, int], folder: Path) -> Wav2Vec2Processor:
    from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2Processor

    # One folder per vocabulary: runs sharing a cache may build different ones at the same time.
    folder = folder / f"processor-{hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:12]}"
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file = folder / "vocab.json"
    write_atomic(vocab_file, json.dumps(vocab, indent=1))
    tokenizer = Wav2Vec2CTCTokenizer(
        str(vocab_file), unk_token=UNK, pad_token=PAD, word_delimiter_token=WORD_DELIMITER
    )
    extractor = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0, do_normalize=True,
        return_attention_mask=False,
    )
    return Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer)


def _fingerprint(utterances: list[Utterance], vocab: dict[str, int], mode: Normalization) -> str:
    """Changes when any file, the vocabulary, the normalisation or the table format changes; reads no audio."""
    digest = hashlib.sha256(json.dumps([CACHE_FORMAT, vocab, mode]).encode())
    for utt in utterances:
        for path in (utt.audio, utt.transcript):
            stat = path.stat()
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _rows(
    utterances: list[Utterance], texts: list[Transcript], processor: Wav2Vec2Processor
) -> Iterator[dict[str, Any]]:
    for utt, text in zip(utterances, texts, strict=True):
        audio = read_audio(utt.audio)
        values = processor.feature_extractor(audio, sampling_rate=SAMPLE_RATE).input_values[0]
        labels = processor.tokenizer(text.target).input_ids
        yield {"id": utt.id, "text": text.reference, "input_values": values, "labels": labels, "length": len(audio)}


def prepare_split(
    utterances: list[Utterance],
    texts: list[Transcript],
    processor: Wav2Vec2Processor,
    cache_dir: Path,
    key: str,
) -> datasets.Dataset:
    """Decode, normalise and tokenise once; later runs memory-map the cached Arrow file."""
    import datasets

    final = cache_dir / key
    arrow = final / "table.arrow"
    if arrow.exists():
        return datasets.Dataset.from_file(str(arrow))
    partial = cache_dir / f"{key}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    features = datasets.Features({
        "id": datasets.Value("string"),
        "text": datasets.Value("string"),
        "input_values": datasets.Sequence(datasets.Value("float32")),
        "labels": datasets.Sequence(datasets.Value("int32")),
        "length": datasets.Value("int64"),
    })
    writer = datasets.arrow_writer.ArrowWriter(features=features, path=str(partial / "table.arrow"))
    for row in _rows(utterances, texts, processor):
        writer.write(row)
    writer.finalize()
    writer.close()
    try:
        partial.rename(final)
    except OSError:  # another rank finished first: its table is as good as ours
        shutil.rmtree(partial, ignore_errors=True)
    return datasets.Dataset.from_file(str(arrow))


@dataclass
class PreparedCorpus:
    train: datasets.Dataset
    test: datasets.Dataset
    processor: Wav2Vec2Processor
    vocab: dict[str, int]


def read_transcripts(utterances: list[Utterance], mode: Normalization) -> list[Transcript]:
    texts = [transcript(read_transcript(u.transcript), mode) for u in utterances]
    for utt, text in zip(utterances, texts, strict=True):
        if not text.reference:
            raise DataError(f"{utt.transcript}: the sentence is empty after normalisation ({mode})")
    return texts


def load_corpus(
    root: str | Path,
    cache_dir: str | Path,
    max_train: int | None = None,
    max_test: int | None = None,
    normalization: Normalization = "clean",
) -> PreparedCorpus:
    """Scan, normalise and prepare both splits; the vocabulary spans both, as in the HF recipe."""
    cache_dir = Path(cache_dir)
    splits = {"train": scan_split(root, "train")[:max_train], "test": scan_split(root, "test")[:max_test]}
    texts = {name: read_transcripts(utts, normalization) for name, utts in splits.items()}
    vocab = build_vocab((t.target for name in SPLITS for t in texts[name]), normalization)
    processor = make_processor(vocab, cache_dir)
    tables = {
        name: prepare_split(
            splits[name], texts[name], processor, cache_dir,
            f"{name}-{_fingerprint(splits[name], vocab, normalization)}",
        )
        for name in SPLITS
    }
    return PreparedCorpus(tables["train"], tables["test"], processor, vocab)
