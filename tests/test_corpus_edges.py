"""Corpus layouts at their edges: a bad file sharing its id with a good one, a file named by an absolute path,
a folder holding one saved Dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from asrlaunch.core.recipe import DataSection
from asrlaunch.data.corpus import DataError, prepare
from asrlaunch.data.sources import cheap_problems, corpus_sources, count_utterances


def test_a_bad_file_does_not_take_the_good_one_that_shares_its_id(tmp_path: Path) -> None:
    """a.wav beside a.flac (an audiofolder's ids are paths without suffix): a missing or untranscribed a.flac
    is left out and counted; a.wav stays, with its words in the vocabulary."""
    from asrlaunch.data.corpus import Source

    def tone() -> tuple[np.ndarray, int]:
        return np.sin(np.arange(16000, dtype=np.float32) / 7), 16000

    def source(ident: str, text: str, where: str, problem: str | None = None) -> Source:
        return Source(ident, text, where, tone, where, None, problem)

    train = [
        source("a", "hello world", "train/a.wav"),
        source("a", "zebra", "train/a.flac", problem="the file is missing"),
        source("b", "good day", "train/b.wav"),
    ]
    corpus = prepare({"train": train, "test": train[2:]}, tmp_path / "cache", "clean", skip_bad=True)
    assert (len(corpus.train), corpus.skipped) == (2, 1)
    assert sorted(corpus.train.column("text")) == ["good day", "hello world"]
    assert "h" in corpus.vocab and "z" not in corpus.vocab


def test_odd_layouts_are_read_or_refused_with_what_to_fix(tmp_path: Path) -> None:
    """An audiofolder's metadata may name a file by an absolute path elsewhere (read, its id that path); a
    folder holding one saved Dataset, not a DatasetDict, is refused with what to save."""
    import datasets
    import soundfile

    elsewhere = tmp_path / "elsewhere" / "far.wav"
    elsewhere.parent.mkdir()
    soundfile.write(elsewhere, np.zeros(16000, dtype=np.float32), 16000)
    folder = tmp_path / "audio"
    folder.mkdir()
    rows = "file_name,text,split\n" + "".join(f"{elsewhere},a b,{s}\n" for s in ("train", "test"))
    (folder / "metadata.csv").write_text(rows)
    sources = corpus_sources(DataSection(dir=str(folder), format="audiofolder"))
    assert [s.id for s in sources["train"]] == [str(elsewhere.with_suffix(""))]
    assert sources["train"][0].problem is None and sources["train"][0].read()[1] == 16000

    audio = [{"array": np.zeros(16000, dtype=np.float32), "sampling_rate": 16000}]
    datasets.Dataset.from_dict({"audio": audio, "text": ["a b"]}).save_to_disk(str(tmp_path / "one"))
    one = DataSection(dir=str(tmp_path / "one"), format="disk")
    for read in (corpus_sources, count_utterances):  # the job's reading and the preflight's count alike
        with pytest.raises(DataError, match="one Dataset, not a DatasetDict; save its 'train' and 'test'"):
            read(one)


def test_the_preflight_checks_the_header_of_a_file_whose_twin_is_missing(tmp_path: Path) -> None:
    """a.flac listed but missing, a.wav beside it with a broken header: both are named before anything is
    queued (the missing twin does not hide the other file's header check)."""
    folder = tmp_path / "audio"
    folder.mkdir()
    (folder / "a.wav").write_bytes(b"not audio")
    rows = "".join(f"{name},a b,{split}\n" for split in ("train", "test") for name in ("a.wav", "a.flac"))
    (folder / "metadata.csv").write_text("file_name,text,split\n" + rows)
    found = cheap_problems(DataSection(dir=str(folder), format="audiofolder"))
    reasons = sorted((p.split, Path(p.where).name, p.reason.split(" (")[0]) for p in found)
    assert reasons == [
        ("test", "a.flac", "the file does not exist"),
        ("test", "a.wav", "unreadable audio"),
        ("train", "a.flac", "the file does not exist"),
        ("train", "a.wav", "unreadable audio"),
    ]
