"""The TIMIT reader on generated corpora: layouts, formats, normalisation, cache and clear errors."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile

from asrlaunch.data import timit
from asrlaunch.data.corpus import decode
from asrlaunch.data.synth import espeak_available, generate_corpus
from asrlaunch.data.text import build_vocab, normalize_text
from asrlaunch.data.timit import DataError, load_corpus, scan_split

from .conftest import PYTHON, engine_command, python_env


def test_normalisation_follows_the_hf_recipe() -> None:
    assert normalize_text("She had your dark suit, in greasy wash-water all year.") == (
        "she had your dark suit in greasy washwater all year"
    )
    assert normalize_text('Don\'t ask "me"; ok?  No!') == "don't ask me ok no"


def test_vocab_has_word_delimiter_unk_and_pad_last() -> None:
    vocab = build_vocab(["ab c", "ca"])
    assert vocab == {"a": 0, "b": 1, "c": 2, "|": 3, "[UNK]": 4, "[PAD]": 5}


@pytest.mark.parametrize(
    ("fmt", "lowercase", "magic"), [("sphere", False, b"NIST_1A"), ("wav", True, b"RIFF")]
)
def test_reader_handles_sphere_wav_and_name_case(
    tmp_path: Path, fmt: str, lowercase: bool, magic: bytes
) -> None:
    root = generate_corpus(tmp_path / "corpus", train=23, test=7, fmt=fmt, lowercase=lowercase)
    train = scan_split(root, "train")
    assert len(train) == 23 and len(scan_split(root, "test")) == 7
    assert train[0].audio.read_bytes().startswith(magic)
    assert all(u.id == u.id.upper() and "_" in u.id for u in train)
    assert {u.audio.parent.parent.name.upper()[:2] for u in train} == {"DR"}
    corpus = load_corpus(root, tmp_path / "cache")
    assert len(corpus.train) == 23 and len(corpus.test) == 7
    row = next(iter(corpus.train))
    assert abs(float(row["input_values"].mean())) < 1e-3 and abs(float(row["input_values"].std()) - 1) < 1e-2
    decoded = corpus.processor.tokenizer.decode(row["labels"], group_tokens=False)
    assert decoded == row["text"]
    assert row["length"] == len(row["input_values"])


@pytest.mark.skipif(
    not espeak_available() and not os.environ.get("CI"), reason="espeak-ng and sox are not installed"
)
def test_espeak_speech_in_sphere_is_read_like_timit(tmp_path: Path) -> None:
    """The generator's default where espeak-ng exists: spoken sentences, SPHERE files written by sox."""
    out = tmp_path / "speech"
    done = subprocess.run(
        [
            PYTHON,
            "-m",
            "asrlaunch",
            "synth",
            "--out",
            str(out),
            "--train",
            "6",
            "--test",
            "2",
            "--lowercase",
        ],
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and "(espeak)" in done.stdout, done.stderr
    train = scan_split(out, "train")
    assert len(train) == 6 and train[0].audio.read_bytes().startswith(b"NIST_1A")
    assert train[0].audio.name.islower()
    corpus = load_corpus(out, tmp_path / "cache")
    assert len(corpus.train) == 6 and len(corpus.test) == 2
    seconds = corpus.train.numbers("length") / 16000
    assert seconds.min() > 0.5 and seconds.max() < 10  # sentences, not silence
    sa1 = next(row for row in corpus.train if row["id"].endswith("SA1"))
    assert sa1["text"] == "she had your dark suit in greasy wash water all year"


def test_riff_copies_beside_sphere_files_are_not_counted_twice(tmp_path: Path) -> None:
    root = generate_corpus(tmp_path / "corpus", train=10, test=3)
    for wav in list(root.rglob("*.WAV")):
        audio, rate = soundfile.read(wav)
        soundfile.write(f"{wav}.wav", audio, rate, format="WAV")  # Kaggle's extra RIFF copies
    utterances = scan_split(root, "train")
    assert len(utterances) == 10
    assert all(u.audio.suffix == ".WAV" for u in utterances)


def test_prepared_table_is_cached_and_not_decoded_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = generate_corpus(tmp_path / "corpus", train=12, test=4)
    first = load_corpus(root, tmp_path / "cache")

    def no_decoding(path: Path, where: str) -> tuple[np.ndarray, int]:
        raise AssertionError(f"decoded {path} although the table is cached")

    monkeypatch.setattr(timit, "decode", no_decoding)  # how TIMIT's sources read audio
    second = load_corpus(root, tmp_path / "cache")
    assert second.train.column("id") == first.train.column("id")
    assert second.vocab == first.vocab
    # a changed file invalidates the cache
    victim = sorted(root.rglob("*.TXT"))[0]
    victim.write_text(victim.read_text().replace("the", "a", 1) + " ")
    with pytest.raises(AssertionError, match="decoded"):
        load_corpus(root, tmp_path / "cache")


def test_a_copy_that_keeps_the_file_times_is_the_same_corpus_wherever_it_lies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A corpus moved or copied with its file times (rsync -a, cp -a, an unpacked tar) is not decoded again,
    and its bad utterances are named where they now are; a copy with new file times is prepared."""
    root = generate_corpus(tmp_path / "corpus", train=12, test=4)
    bad = _one_wav(root)
    bad.write_bytes(b"not audio")
    with pytest.raises(DataError, match=str(bad)):
        load_corpus(root, tmp_path / "cache")

    staged = Path(shutil.copytree(root, tmp_path / "scratch" / "timit"))  # copy2 keeps times
    decoded: list[Path] = []

    def recording_decode(path: Path, where: str) -> tuple[np.ndarray, int]:
        decoded.append(path)
        return decode(path, where)

    monkeypatch.setattr(timit, "decode", recording_decode)  # how TIMIT's sources read audio
    with pytest.raises(DataError, match=str(staged / bad.relative_to(root))) as raised:
        load_corpus(staged, tmp_path / "cache")
    assert decoded == [] and str(root) not in str(raised.value)

    fresh = Path(shutil.copytree(root, tmp_path / "fresh", copy_function=shutil.copyfile))  # new times
    with pytest.raises(DataError):
        load_corpus(fresh, tmp_path / "cache")
    assert len(decoded) == 16


def _one_wav(root: Path) -> Path:
    return sorted((root / "TRAIN").rglob("*.WAV"))[0]


def test_bad_corpora_name_the_file(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(tmp_path / "missing", cache)

    root = generate_corpus(tmp_path / "c1", train=5, test=2)
    wav = _one_wav(root)
    wav.write_bytes(b"not audio at all")
    with pytest.raises(DataError, match=rf"{wav}: unreadable audio"):
        load_corpus(root, cache)

    root = generate_corpus(tmp_path / "c2", train=5, test=2)
    wav = _one_wav(root)
    stereo = np.stack([np.linspace(-0.5, 0.5, 8000), np.zeros(8000)], axis=1)
    soundfile.write(wav, stereo, 16000, format="NIST", subtype="PCM_16")
    samples, rate = decode(wav, str(wav))  # not refused: the channels averaged, as datasets' Audio(mono=True)
    assert rate == 16000 and np.allclose(samples, stereo.mean(axis=1), atol=1e-4)
    load_corpus(root, cache)

    root = generate_corpus(tmp_path / "c3", train=5, test=2)
    wav = _one_wav(root)
    wav.with_suffix(".TXT").unlink()
    with pytest.raises(DataError, match=rf"{wav}: no transcript"):
        load_corpus(root, cache)

    root = generate_corpus(tmp_path / "c4", train=5, test=2)
    shutil.rmtree(root / "TEST")
    (root / "TEST" / "DR1").mkdir(parents=True)
    with pytest.raises(DataError, match="the test split holds no utterance"):
        load_corpus(root, cache)

    root = generate_corpus(tmp_path / "c5", train=5, test=2)
    txt = _one_wav(root).with_suffix(".TXT")
    txt.write_text("no offsets here\n")
    with pytest.raises(DataError, match=rf"{txt}: expected '<start> <end> <sentence>'"):
        load_corpus(root, cache)


def test_the_engine_reports_a_bad_corpus_without_a_traceback(tmp_path: Path) -> None:
    """As users meet it: `python -m asrlaunch.engine.train` on a corpus with a damaged file (a file at another
    sample rate is no longer an error: it is resampled, see test_formats.py)."""
    root = generate_corpus(tmp_path / "corpus", train=5, test=2)
    wav = _one_wav(root)
    wav.write_bytes(b"NIST_1A but not really")
    done = subprocess.run(
        engine_command(tmp_path / "run", root, 1),
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"error: {wav}: unreadable audio" in done.stderr
