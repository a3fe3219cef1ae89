"""Generate a corpus in TIMIT's layout, for tests, demos and smoke runs (TIMIT itself is licensed).

Two engines (`auto`, the command's default, takes espeak when espeak-ng and sox are installed, else tones):
- `espeak`: real synthetic speech (espeak-ng, several voices, speeds and pitches; SPHERE via sox).
  Realistic, but a tiny model trained from scratch does not learn it in minutes.
- `tones`: numpy only. Each character is a short tone of its own frequency, words are separated by
  silence; speakers differ in tempo, pitch and loudness, with background noise. A ~0.2M-parameter model
  learns it in a couple of minutes on a CPU, which is what a smoke run needs to show that training works.

    asrlaunch synth --out data/synth --train 400 --test 100
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
ENGINES = ("auto", "espeak", "tones")
# Words over twelve letters only: fewer, well-separated tones make the `tones` corpus learnable in minutes.
WORDS = [
    "the",
    "red",
    "hat",
    "sat",
    "on",
    "a",
    "tan",
    "sled",
    "her",
    "tall",
    "dear",
    "rose",
    "said",
    "the",
    "old",
    "lion",
    "hid",
    "in",
    "the",
    "dense",
    "thin",
    "trees",
    "ten",
    "ants",
    "eat",
    "and",
    "rest",
    "near",
    "a",
    "dark",
    "lake",
    "at",
    "noon",
    "she",
    "has",
    "a",
    "sad",
    "seal",
    "tie",
    "it",
    "less",
    "late",
]
# TIMIT's two dialect sentences, read by every speaker (the espeak engine speaks these).
SA_SENTENCES = (
    "She had your dark suit in greasy wash water all year.",
    "Don't ask me to carry an oily rag like that.",
)
# The tones engine reads two sentences of its own alphabet instead.
SA_TONES = ("The old lion hid in the dense trees.", "She said the red hat sat on a tan sled.")
UTTERANCES_PER_SPEAKER = ("SA1", "SA2", "SX1", "SX2", "SX3", "SX4", "SX5", "SI1", "SI2", "SI3")


def random_sentence(rng: np.random.Generator) -> str:
    words = rng.choice(WORDS, size=int(rng.integers(3, 8)))
    text = " ".join(str(w) for w in words)
    return text[0].upper() + text[1:] + rng.choice([".", ".", "?", "!"])


def tone_frequencies() -> dict[str, float]:
    """Log-spaced frequencies 300-5000 Hz, one per letter of WORDS: neighbours differ by ~30%."""
    letters = sorted({c for word in WORDS for c in word})
    return {char: 300.0 * ((5000 / 300) ** (i / (len(letters) - 1))) for i, char in enumerate(letters)}


def tones_audio(text: str, rng: np.random.Generator, tempo: float, pitch: float) -> np.ndarray:
    """Render normalised text as tones: ~60 ms per character, 20 ms gaps, ~100 ms between words."""
    frequencies = tone_frequencies()
    char_len, gap_len = int(0.06 * SAMPLE_RATE * tempo), int(0.02 * SAMPLE_RATE * tempo)
    pieces = [np.zeros(int(0.1 * SAMPLE_RATE))]
    for char in text.lower():
        if char in frequencies:
            t = np.arange(char_len) / SAMPLE_RATE
            envelope = np.hanning(char_len) ** 0.5
            phase = rng.uniform(0, 2 * np.pi)
            pieces.append(envelope * np.sin(2 * np.pi * frequencies[char] * pitch * t + phase))
            pieces.append(np.zeros(gap_len))
        elif char == " ":
            pieces.append(np.zeros(int(0.1 * SAMPLE_RATE * tempo)))
    pieces.append(np.zeros(int(0.1 * SAMPLE_RATE)))
    audio = np.concatenate(pieces) * rng.uniform(0.2, 0.6)
    return (audio + rng.normal(0, 0.01, len(audio))).astype(np.float32)


def espeak_audio(text: str, voice: str, speed: int, pitch: int, out: Path, fmt: str) -> None:
    speech = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
        check=True,
        capture_output=True,
    ).stdout
    kind = "sph" if fmt == "sphere" else "wav"
    subprocess.run(
        [
            "sox",
            "-q",
            "-t",
            "wav",
            "-",
            "-r",
            str(SAMPLE_RATE),
            "-c",
            "1",
            "-b",
            "16",
            "-e",
            "signed-integer",
            "-t",
            kind,
            str(out),
        ],
        input=speech,
        check=True,
        capture_output=True,
    )


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None and shutil.which("sox") is not None


def resolve_engine(engine: str) -> str:
    """`auto` -> espeak where espeak-ng and sox are installed, else the dependency-free tones."""
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r} is not one of {', '.join(ENGINES)}")
    if engine == "auto":
        return "espeak" if espeak_available() else "tones"
    return engine


def _speaker_ids(count: int, rng: np.random.Generator) -> list[str]:
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    ids: set[str] = set()
    while len(ids) < count:
        ids.add(rng.choice(["F", "M"]) + "".join(rng.choice(list(letters), 3)) + str(rng.integers(0, 10)))
    return sorted(ids)


def write_split(
    root: Path,
    split: str,
    count: int,
    rng: np.random.Generator,
    engine: str,
    fmt: str,
    lowercase: bool,
) -> None:
    """Write `count` utterances of one split: DR1..DR8/<SPEAKER>/<UTT>.{WAV,TXT}, ten per speaker."""
    import soundfile

    name = (lambda s: s.lower()) if lowercase else (lambda s: s)
    speakers = _speaker_ids(-(-count // len(UTTERANCES_PER_SPEAKER)), rng)
    written = 0
    for index, speaker in enumerate(speakers):
        folder = root / name(split) / name(f"DR{index % 8 + 1}") / name(speaker)
        folder.mkdir(parents=True, exist_ok=True)
        tempo, pitch = rng.uniform(0.85, 1.2), rng.uniform(0.97, 1.03)
        voice = f"en-us+{rng.choice(['m1', 'm3', 'm5', 'f1', 'f2', 'f3'])}"
        speed, espeak_pitch = int(rng.integers(140, 190)), int(rng.integers(30, 70))
        for utt in UTTERANCES_PER_SPEAKER[: count - written]:
            sa = SA_SENTENCES if engine == "espeak" else SA_TONES
            text = sa[int(utt[-1]) - 1] if utt.startswith("SA") else random_sentence(rng)
            wav = folder / name(f"{utt}.WAV")
            if engine == "espeak":
                espeak_audio(text.rstrip(".?!"), voice, speed, espeak_pitch, wav, fmt)
                frames = soundfile.info(str(wav)).frames
            else:
                audio = tones_audio(text, rng, tempo, pitch)
                soundfile.write(
                    str(wav),
                    audio,
                    SAMPLE_RATE,
                    format="NIST" if fmt == "sphere" else "WAV",
                    subtype="PCM_16",
                )
                frames = len(audio)
            (folder / name(f"{utt}.TXT")).write_text(f"0 {frames} {text}\n")
            written += 1


def timit_utterances(root: Path) -> dict[str, list[tuple[str, Path, str]]]:
    """(id, audio file, sentence) of each split of a TIMIT-layout corpus."""
    from asrlaunch.data.timit import read_transcript, scan_split

    return {
        split: [
            (u.id, u.audio, read_transcript(u.transcript)) for u in scan_split(root, split) if u.transcript
        ]
        for split in ("train", "test")
    }


def resampled(path: Path, rate: int) -> np.ndarray:
    import soundfile
    import soxr

    audio, original = soundfile.read(str(path), dtype="float32")
    return audio if rate == original else np.asarray(soxr.resample(audio, original, rate), dtype=np.float32)


def write_audiofolder(timit: Path, out: Path, rate: int) -> None:
    """train/ and test/, each with its WAV files and a metadata.csv (file_name, text)."""
    import soundfile

    for split, utterances in timit_utterances(timit).items():
        folder = out / split
        folder.mkdir(parents=True)
        with (folder / "metadata.csv").open("w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            writer.writerow(["file_name", "text"])
            for ident, audio, sentence in utterances:
                soundfile.write(str(folder / f"{ident}.wav"), resampled(audio, rate), rate, subtype="PCM_16")
                writer.writerow([f"{ident}.wav", sentence])


def write_disk(timit: Path, out: Path, rate: int) -> None:
    """A DatasetDict (train, test) saved with save_to_disk: id, audio (WAV bytes, an Audio feature), text."""
    import io

    import datasets
    import soundfile

    splits = {}
    for split, utterances in timit_utterances(timit).items():
        rows: dict[str, list] = {"id": [], "audio": [], "text": []}
        for ident, audio, sentence in utterances:
            buffer = io.BytesIO()
            soundfile.write(buffer, resampled(audio, rate), rate, format="WAV", subtype="PCM_16")
            rows["id"].append(ident)
            rows["audio"].append({"bytes": buffer.getvalue(), "path": None})
            rows["text"].append(sentence)
        # Stored as the Audio feature's own struct, then cast: encoding through Audio needs torchcodec.
        stored = {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}
        features = datasets.Features(
            {"id": datasets.Value("string"), "audio": stored, "text": datasets.Value("string")}
        )
        table = datasets.Dataset.from_dict(rows, features=features)
        splits[split] = table.cast_column("audio", datasets.Audio(sampling_rate=rate, decode=False))
    datasets.DatasetDict(splits).save_to_disk(str(out))


def generate_corpus(
    out: str | Path,
    train: int,
    test: int,
    engine: str = "tones",
    fmt: str = "sphere",
    lowercase: bool = False,
    seed: int = 0,
    layout: str = "timit",
    sample_rate: int = SAMPLE_RATE,
) -> Path:
    """Write a corpus into `out` (created; written to a temporary folder, then renamed): TIMIT's layout, or
    the same utterances as an audiofolder or a dataset saved to disk, at `sample_rate`."""
    engine = resolve_engine(engine)
    if engine == "espeak" and not espeak_available():
        raise RuntimeError("the espeak engine needs espeak-ng and sox (apt-get install espeak-ng sox)")
    out = Path(out)
    partial = out.with_name(f"{out.name}.partial-{os.getpid()}")  # jobs of a sweep may race to create it
    shutil.rmtree(partial, ignore_errors=True)
    timit = partial if layout == "timit" else partial.with_name(partial.name + "-timit")
    for split, count, offset in (("TRAIN", train, 1), ("TEST", test, 2)):
        write_split(timit, split, count, np.random.default_rng([seed, offset]), engine, fmt, lowercase)
    if layout == "audiofolder":
        write_audiofolder(timit, partial, sample_rate)
    elif layout == "disk":
        write_disk(timit, partial, sample_rate)
    if timit != partial:
        shutil.rmtree(timit)
    try:
        partial.rename(out)
    except OSError:  # another job finished first; the corpus is the same (same seed)
        shutil.rmtree(partial, ignore_errors=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from asrlaunch.core.exits import ExitCode

    parser = argparse.ArgumentParser(
        prog="asrlaunch synth", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="corpus folder to create (must not exist)")
    parser.add_argument("--train", type=int, default=400, help="training utterances")
    parser.add_argument("--test", type=int, default=100, help="test utterances")
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="auto",
        help="auto: espeak where espeak-ng and sox exist, else tones",
    )
    parser.add_argument("--format", choices=["sphere", "wav"], default="sphere", dest="fmt")
    parser.add_argument("--lowercase", action="store_true", help="lower-case file and folder names")
    parser.add_argument("--layout", choices=["timit", "audiofolder", "disk"], default="timit")
    parser.add_argument("--sample-rate", type=int, default=SAMPLE_RATE, help="audiofolder and disk layouts")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if Path(args.out).exists():
        parser.error(f"{args.out} exists already; choose a new folder")
    path = generate_corpus(
        args.out,
        args.train,
        args.test,
        args.engine,
        args.fmt,
        args.lowercase,
        args.seed,
        args.layout,
        args.sample_rate,
    )
    engine = resolve_engine(args.engine)
    print(f"wrote {args.train} train and {args.test} test utterances ({engine}) to {path}")
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
