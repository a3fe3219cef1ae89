"""Any corpus -> prepared tables (normalised audio, labels, lengths) cached as Arrow, with its processor.

A corpus is a list of `Source`s per split (TIMIT's layout, an audiofolder, a dataset saved to disk: see
timit.py and sources.py); from there everything is shared: text normalisation and the vocabulary over both
splits (text.py), 16 kHz audio (resampled where it is not), the feature extractor, the tokenizer, the cache.
Decoding and preparing import soundfile, soxr, transformers and datasets lazily: the launcher side may import
this module to count utterances.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from asrlaunch.data.text import (
    BOS,
    EOS,
    PAD,
    UNK,
    WORD_DELIMITER,
    Normalization,
    Transcript,
    build_vocab,
    transcript,
)

if TYPE_CHECKING:
    import datasets
    from transformers import Wav2Vec2Processor

SAMPLE_RATE = 16000
SPLITS = ("train", "test")
CACHE_FORMAT = 3  # bump when the prepared table changes shape


class DataError(ValueError):
    """The corpus is unusable; the message names the file or folder (and column) to fix."""


@dataclass(frozen=True)
class Source:
    """One utterance of a split: its id, its raw transcript, where its audio is (`where`, for messages), how to
    read it (`read`: samples and rate) and what identifies its content for the cache (`stamp`)."""

    id: str
    text: str
    where: str
    read: Callable[[], tuple[np.ndarray, int]]
    stamp: str


def file_stamp(path: Path) -> str:
    stat = path.stat()
    return f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}"


def decode(data: Path | bytes, where: str) -> tuple[np.ndarray, int]:
    """Samples (float32, mono) and rate of an audio file or its bytes, through soundfile."""
    import soundfile

    try:
        audio, rate = soundfile.read(io.BytesIO(data) if isinstance(data, bytes) else str(data), dtype="float32",
                                     always_2d=True)
    except Exception as error:  # soundfile raises its own LibsndfileError, RuntimeError or OSError
        raise DataError(f"{where}: unreadable audio ({error})") from None
    if audio.shape[1] != 1:
        raise DataError(f"{where}: {audio.shape[1]} channels, expected mono")
    return audio[:, 0], int(rate)


def to_16k(audio: np.ndarray, rate: int, where: str) -> np.ndarray:
    """wav2vec2 hears 16 kHz: other rates are resampled (soxr, high quality)."""
    if audio.shape[0] == 0:
        raise DataError(f"{where}: no samples")
    if rate == SAMPLE_RATE:
        return audio
    import soxr

    return np.asarray(soxr.resample(audio, rate, SAMPLE_RATE, quality="HQ"), dtype=np.float32)


def read_audio(path: Path) -> np.ndarray:
    """A file's samples at 16 kHz."""
    audio, rate = decode(path, str(path))
    return to_16k(audio, rate, str(path))


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
    # bos and eos named explicitly: added after [UNK] and [PAD], as the reference card's tokenizer did
    tokenizer = Wav2Vec2CTCTokenizer(
        str(vocab_file),
        unk_token=UNK,
        pad_token=PAD,
        word_delimiter_token=WORD_DELIMITER,
        bos_token=BOS,
        eos_token=EOS,
    )
    extractor = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0, do_normalize=True,
        return_attention_mask=False,
    )
    return Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer)


def fingerprint(sources: list[Source], vocab: dict[str, int], mode: Normalization) -> str:
    """Changes when any source, the vocabulary, the normalisation or the table format changes; reads no audio."""
    digest = hashlib.sha256(json.dumps([CACHE_FORMAT, vocab, mode]).encode())
    for source in sources:
        digest.update(f"{source.id}\0{source.stamp}\n".encode())
    return digest.hexdigest()[:16]


def _rows(
    sources: list[Source],
    texts: list[Transcript],
    processor: Wav2Vec2Processor,
    on_progress: Callable[[], None] | None = None,
) -> Iterator[dict[str, Any]]:
    for source, text in zip(sources, texts, strict=True):
        if on_progress is not None:
            on_progress()
        audio = to_16k(*source.read(), source.where)
        values = processor.feature_extractor(audio, sampling_rate=SAMPLE_RATE).input_values[0]
        labels = processor.tokenizer(text.target).input_ids
        yield {"id": source.id, "text": text.reference, "input_values": values, "labels": labels,
               "length": len(audio)}


def prepare_split(
    sources: list[Source],
    texts: list[Transcript],
    processor: Wav2Vec2Processor,
    cache_dir: Path,
    key: str,
    on_progress: Callable[[], None] | None = None,
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
    for row in _rows(sources, texts, processor, on_progress):
        writer.write(row)
    writer.finalize()
    writer.close()
    try:
        partial.rename(final)
    except OSError:  # another rank finished first: its table is as good as ours
        shutil.rmtree(partial, ignore_errors=True)
    return datasets.Dataset.from_file(str(arrow))


def save_processor(processor: Wav2Vec2Processor, folder: Path) -> None:
    """The processor as save_pretrained writes it, plus `special_tokens_map.json` as transformers 4.15 (the
    reference card's) wrote it beside `added_tokens.json`."""
    processor.save_pretrained(folder)
    tokenizer = processor.tokenizer
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    mapping = {name: str(getattr(tokenizer, name)) for name in names}
    write_atomic(folder / "special_tokens_map.json", json.dumps(mapping, indent=2))


@dataclass
class PreparedCorpus:
    train: datasets.Dataset
    test: datasets.Dataset
    processor: Wav2Vec2Processor
    vocab: dict[str, int]

    @property
    def vocab_size(self) -> int:
        """The model's output units: the tokenizer's length, its added `<s>` and `</s>` counted (the reference
        script sized the head with `len(tokenizer)`)."""
        return len(self.processor.tokenizer)


def normalise(sources: list[Source], mode: Normalization) -> list[Transcript]:
    texts = [transcript(source.text, mode) for source in sources]
    for source, text in zip(sources, texts, strict=True):
        if not text.reference:
            raise DataError(f"{source.where}: the transcript is empty after normalisation ({mode})")
    return texts


def prepare(
    splits: dict[str, list[Source]],
    cache_dir: str | Path,
    mode: Normalization,
    on_progress: Callable[[], None] | None = None,
) -> PreparedCorpus:
    """Normalise and prepare both splits; the vocabulary spans both, as in the HF recipe."""
    cache_dir = Path(cache_dir)
    texts = {name: normalise(splits[name], mode) for name in SPLITS}
    vocab = build_vocab((t.target for name in SPLITS for t in texts[name]), mode)
    processor = make_processor(vocab, cache_dir)
    tables = {
        name: prepare_split(
            splits[name],
            texts[name],
            processor,
            cache_dir,
            f"{name}-{fingerprint(splits[name], vocab, mode)}",
            on_progress,
        )
        for name in SPLITS
    }
    return PreparedCorpus(tables["train"], tables["test"], processor, vocab)
