"""Any corpus -> prepared tables (normalised audio, labels, lengths) cached as Arrow, with its processor.

A corpus is a list of `Source`s per split (TIMIT's layout, an audiofolder, a dataset saved to disk: see
timit.py and sources.py); from there everything is shared: text normalisation and the vocabulary over both
splits (text.py), 16 kHz audio (resampled where it is not), the feature extractor, the tokenizer, the cache.
Decoding and preparing import soundfile, soxr, pyarrow and transformers lazily: the launcher side (the base
install) imports this module to count utterances and to see whether a corpus is prepared.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from asrlaunch.data.building import building, remove_abandoned_builds
from asrlaunch.data.cache import (
    mark_used,
    processor_dir,
    report_file,
    table_file,
    write_atomic,
    write_unless_equal,
)
from asrlaunch.data.text import (
    BOS,
    EOS,
    PAD,
    UNK,
    WORD_DELIMITER,
    Normalization,
    Transcript,
    build_vocab,
    ctc_min_frames,
    transcript,
)

if TYPE_CHECKING:
    from transformers import Wav2Vec2Processor

    from asrlaunch.data.table import Table

SAMPLE_RATE = 16000
SPLITS = ("train", "test")
CACHE_FORMAT = 3  # bump when the prepared table changes shape


class DataError(ValueError):
    """The corpus is unusable; the message names the file or folder (and column) to fix."""


@dataclass(frozen=True)
class Source:
    """One utterance of a split: its id, its raw transcript, where its audio is (`where`, for messages), how
    to read it (`read`: samples and rate), what identifies its content for the cache (`stamp`), its audio file
    when it has one (`path`: the cheap header check), and a defect found while reading the layout (`problem`:
    no transcript, a missing file)."""

    id: str
    text: str
    where: str
    read: Callable[[], tuple[np.ndarray, int]]
    stamp: str
    path: Path | None = None
    problem: str | None = None


@dataclass(frozen=True)
class Problem:
    """An utterance that cannot be trained or evaluated on, and why."""

    split: str
    id: str
    where: str
    reason: str

    def line(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass(frozen=True)
class Checks:
    """What makes decoded audio unusable beyond an unreadable file: `frames` (the model's CTC frames for a
    number of 16 kHz samples) finds audio too short for one frame and, with `transcript_fits`, a transcript
    that needs more frames than its audio gives (its loss is infinite; flagged when the recipe does not zero
    such losses, `model.ctc_zero_infinity: false`)."""

    frames: Callable[[int], int] | None = None
    transcript_fits: bool = False
    key: str = ""  # what `frames` and `transcript_fits` depend on, for the cache (prepare.checks_key)

    def problem(self, samples: int, labels: list[int]) -> str | None:
        if self.frames is None:
            return None
        frames = self.frames(samples)
        if frames < 1:
            return f"too short: {samples} samples ({samples / SAMPLE_RATE:.3f} s) give no CTC frame"
        need = ctc_min_frames(labels)
        if self.transcript_fits and need > frames:
            seconds = samples / SAMPLE_RATE
            return f"its transcript needs {need} CTC frames, its {seconds:.2f} s of audio give {frames}"
        return None


def file_stamp(path: Path) -> str:
    """A file's content as the cache key follows it: its name, size and modification time. Not where the
    corpus lies: a corpus moved, or copied with its times (`rsync -a`, `cp -a`, an unpacked tar: to scratch
    storage, each user's own copy), is the same corpus and is not prepared again."""
    try:
        stat = path.stat()
    except OSError:
        return f"{path.name}\0missing"
    return f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}"


def decode(data: Path | bytes, where: str) -> tuple[np.ndarray, int]:
    """Samples (float32, mono: channels averaged) and rate of an audio file or its bytes (soundfile)."""
    import soundfile

    try:
        audio, rate = soundfile.read(
            io.BytesIO(data) if isinstance(data, bytes) else str(data), dtype="float32", always_2d=True
        )
    except Exception as error:  # soundfile raises its own LibsndfileError, RuntimeError or OSError
        raise DataError(f"{where}: unreadable audio ({error})") from None
    # Several channels are averaged, as datasets' Audio feature does (mono=True).
    return (audio[:, 0] if audio.shape[1] == 1 else audio.mean(axis=1)), int(rate)


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


def make_processor(vocab: dict[str, int], folder: Path) -> Wav2Vec2Processor:
    from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2Processor

    # One folder per vocabulary: runs sharing a cache may build different ones at the same time.
    folder = processor_dir(folder, vocab)
    folder.mkdir(parents=True, exist_ok=True)
    mark_used(folder)
    vocab_file = folder / "vocab.json"
    write_unless_equal(vocab_file, json.dumps(vocab, indent=1))
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
        feature_size=1,
        sampling_rate=SAMPLE_RATE,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=False,
    )
    return Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer)


def fingerprint(
    sources: list[Source], texts: list[Transcript], vocab: dict[str, int], mode: Normalization, checks: str
) -> str:
    """Changes when any source or its transcript, the vocabulary, the normalisation, the checks that keep an
    utterance out (`checks`: what they depend on) or the table format changes; reads no audio."""
    digest = hashlib.sha256(json.dumps([CACHE_FORMAT, vocab, mode, checks]).encode())
    for source, text in zip(sources, texts, strict=True):
        digest.update(f"{source.id}\0{source.stamp}\0{text.target}\0{text.reference}\n".encode())
    return digest.hexdigest()[:16]


def _rows(
    split: str,
    sources: list[Source],
    texts: list[Transcript],
    processor: Wav2Vec2Processor,
    checks: Checks,
    on_progress: Callable[[], None] | None = None,
) -> Iterator[dict[str, Any] | Problem]:
    """Each utterance's prepared row, or the problem that keeps it out (every one is tried)."""
    for source, text in zip(sources, texts, strict=True):
        if on_progress is not None:
            on_progress()
        try:
            audio = to_16k(*source.read(), source.where)
        except DataError as error:
            yield Problem(split, source.id, source.where, str(error).removeprefix(f"{source.where}: "))
            continue
        labels = processor.tokenizer(text.target).input_ids
        reason = checks.problem(len(audio), labels)
        if reason is not None:
            yield Problem(split, source.id, source.where, reason)
            continue
        values = processor.feature_extractor(audio, sampling_rate=SAMPLE_RATE).input_values[0]
        yield {
            "id": source.id,
            "text": text.reference,
            "input_values": values,
            "labels": labels,
            "length": len(audio),
        }


def save_processor(processor: Wav2Vec2Processor, folder: Path) -> None:
    """The processor as save_pretrained writes it, plus `special_tokens_map.json` as transformers 4.15 (the
    reference card's) wrote it beside `added_tokens.json`."""
    processor.save_pretrained(folder)
    tokenizer = processor.tokenizer
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    mapping = {name: str(getattr(tokenizer, name)) for name in names}
    write_atomic(folder / "special_tokens_map.json", json.dumps(mapping, indent=2))


PROBLEMS = "problems.json"  # beside a prepared table: the utterances left out of it, and why


def stored_problems(path: Path, sources: list[Source]) -> list[Problem]:
    """The problems a table's build found, each named where its utterance is now (in its reason too, which
    may quote the file): the table may have been built from a copy of the corpus in another folder."""
    if not path.exists():
        return []
    ids = Counter(source.id for source in sources)  # a.wav beside a.flac: one id, two files
    now = {source.id: source.where for source in sources if ids[source.id] == 1}
    problems = [Problem(**stored) for stored in json.loads(path.read_text())]
    moved = [(p, now.get(p.id, p.where)) for p in problems]
    return [replace(p, where=where, reason=p.reason.replace(p.where, where)) for p, where in moved]


def prepare_split(
    split: str,
    sources: list[Source],
    texts: list[Transcript],
    processor: Wav2Vec2Processor,
    cache_dir: Path,
    key: str,
    checks: Checks,
    on_progress: Callable[[], None] | None = None,
) -> tuple[Table, list[Problem], bool]:
    """Decode, normalise and tokenise once; later runs memory-map the cached Arrow file. Returns the table
    (without the utterances that cannot be used), those utterances' problems, and whether the cache held
    it."""
    from asrlaunch.data.table import Table, TableWriter

    arrow = table_file(cache_dir, key)
    final = arrow.parent
    if arrow.exists():
        mark_used(final)
        return Table(arrow), stored_problems(final / PROBLEMS, sources), True
    with building(final) as partial:
        writer = TableWriter(partial / arrow.name)
        problems = []
        for row in _rows(split, sources, texts, processor, checks, on_progress):
            if isinstance(row, Problem):
                problems.append(row)
            else:
                writer.write(row)
        writer.close()
        (partial / PROBLEMS).write_text(json.dumps([asdict(p) for p in problems]))
    return Table(arrow), problems, False


@dataclass
class PreparedCorpus:
    train: Table
    test: Table
    processor: Wav2Vec2Processor
    vocab: dict[str, int]
    skipped: int = 0  # bad utterances left out (`data.skip_bad`)
    cache_hit: bool = False  # both tables came from the cache
    keys: dict[str, str] = field(default_factory=dict)  # each split's table in the cache
    folders: tuple[Path, ...] = ()  # its tables' and processor's in the cache

    def mark_used(self) -> None:
        """A long run keeps its tables from looking idle to `asrlaunch cache --remove-idle-days`."""
        for folder in self.folders:
            mark_used(folder)

    @property
    def vocab_size(self) -> int:
        """The model's output units: the tokenizer's length, its added `<s>` and `</s>` counted (the reference
        script sized the head with `len(tokenizer)`)."""
        return len(self.processor.tokenizer)


def text_problems(
    split: str, sources: list[Source], texts: list[Transcript], mode: Normalization
) -> list[Problem]:
    """Defects found while reading the layout, and transcripts that are empty once normalised."""
    problems = []
    for source, text in zip(sources, texts, strict=True):
        if source.problem:
            problems.append(Problem(split, source.id, source.where, source.problem))
        elif not text.reference:
            reason = f"the transcript is empty after normalisation ({mode})"
            problems.append(Problem(split, source.id, source.where, reason))
    return problems


def report(problems: list[Problem], cache_dir: Path, data_dir: str) -> tuple[Path, str]:
    """The file listing every bad utterance (tab-separated: split, id, file, reason), and one line about
    them: how many, the first few, where the rest are."""
    body = "split\tid\tfile\treason\n" + "".join(
        f"{p.split}\t{p.id}\t{p.where}\t{p.reason}\n" for p in problems
    )
    path = report_file(cache_dir, body)
    cache_dir.mkdir(parents=True, exist_ok=True)
    write_unless_equal(path, body)
    if len(problems) == 1:
        return path, f"{problems[0].line()} (the only bad utterance, listed in {path})"
    shown = "; ".join(p.line() for p in problems[:3])
    more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
    return path, f"{len(problems)} bad utterances in {data_dir}: {shown}{more}; every one is listed in {path}"


@dataclass(frozen=True)
class Layout:
    """A corpus as its sources and transcripts say, without its audio: what each split's cache key follows."""

    texts: dict[str, list[Transcript]]
    problems: list[Problem]  # found in the layout and the transcripts
    usable: dict[str, list[int]]  # each split's utterances without such a problem
    vocab: dict[str, int]  # over both splits' usable transcripts, as in the HF recipe
    keys: dict[str, str]  # each split's cache folder


def read_layout(splits: dict[str, list[Source]], mode: Normalization, checks: str) -> Layout:
    """The layout of both splits (`checks`: what the checks that keep an utterance out depend on)."""
    texts = {name: [transcript(s.text, mode) for s in splits[name]] for name in SPLITS}
    problems = [p for name in SPLITS for p in text_problems(name, splits[name], texts[name], mode)]
    bad = {(p.split, p.id, p.where) for p in problems}  # not by id alone: a.wav and a.flac share one
    usable = {
        name: [i for i, s in enumerate(splits[name]) if (name, s.id, s.where) not in bad] for name in SPLITS
    }
    vocab = build_vocab((texts[name][i].target for name in SPLITS for i in usable[name]), mode)
    keys = {name: f"{name}-{fingerprint(splits[name], texts[name], vocab, mode, checks)}" for name in SPLITS}
    return Layout(texts, problems, usable, vocab, keys)


def prepare(
    splits: dict[str, list[Source]],
    cache_dir: str | Path,
    mode: Normalization,
    on_progress: Callable[[], None] | None = None,
    checks: Checks | None = None,
    skip_bad: bool = False,
    data_dir: str = "data.dir",
) -> PreparedCorpus:
    """Normalise and prepare both splits, every utterance checked; the vocabulary spans both, as in the HF
    recipe. Bad utterances are all reported at once (DataError, one line and a file), or, with `skip_bad`,
    left out and counted."""
    cache_dir, checks = Path(cache_dir), checks or Checks()
    for removed in remove_abandoned_builds(cache_dir):
        print(f"corpus: removed {removed}, a build on this host whose process ended first", flush=True)
    layout = read_layout(splits, mode, checks.key)
    texts, problems, vocab = layout.texts, list(layout.problems), layout.vocab
    processor = make_processor(vocab, cache_dir)
    tables, hits = {}, []
    for name in SPLITS:
        sources, kept = splits[name], layout.usable[name]
        tables[name], found, hit = prepare_split(
            name,
            [sources[i] for i in kept],
            [texts[name][i] for i in kept],
            processor,
            cache_dir,
            layout.keys[name],
            checks,
            on_progress,
        )
        problems += found
        hits.append(hit)
    if problems:
        _, line = report(problems, cache_dir, data_dir)
        if not skip_bad:
            raise DataError(f"{line}; fix them, or set data.skip_bad=true to leave them out of the run")
        empty = [name for name in SPLITS if len(tables[name]) == 0]
        if empty:
            raise DataError(f"{line}; no usable utterance is left in the {' and '.join(empty)} split")
    folders = (*(tables[name].path.parent for name in SPLITS), processor_dir(cache_dir, vocab))
    return PreparedCorpus(
        tables["train"], tables["test"], processor, vocab, len(problems), all(hits), layout.keys, folders
    )
