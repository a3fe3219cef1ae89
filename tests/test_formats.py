"""Datasets beyond TIMIT: the same generated utterances as TIMIT's layout, an audiofolder at 22.05 kHz (the
loader resamples) and a dataset saved to disk prepare alike and train alike; bad metadata says what to fix."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from asrlaunch.core.logs import read_run_logs
from asrlaunch.core.recipe import DataSection, Recipe, load_recipe
from asrlaunch.data.corpus import DataError, prepare
from asrlaunch.data.prepare import (
    CorpusPeers,
    cache_dir,
    is_prepared,
    job_local_variables,
    prepare_corpus,
    unset_variables,
)
from asrlaunch.data.sources import cheap_problems, corpus_sources, count_utterances
from asrlaunch.data.synth import generate_corpus

from .conftest import PYTHON, RECIPES, TRAINED_SMOKE, engine_command, python_env

LAYOUTS = {"timit": 16000, "audiofolder": 22050, "disk": 16000}


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("formats")
    return {
        layout: generate_corpus(root / layout, train=64, test=16, seed=1, layout=layout, sample_rate=rate)
        for layout, rate in LAYOUTS.items()
    }


def prepared(corpora: dict[str, Path], layout: str, cache: Path):
    data = DataSection(dir=str(corpora[layout]), format=layout)
    assert count_utterances(data) == {"train": 64, "test": 16}
    return prepare(corpus_sources(data), cache / layout, "clean")


def test_three_layouts_prepare_to_the_same_tables(corpora: dict[str, Path], tmp_path: Path) -> None:
    tables = {layout: prepared(corpora, layout, tmp_path) for layout in LAYOUTS}
    timit = tables["timit"].train
    assert tables["audiofolder"].vocab == tables["disk"].vocab == tables["timit"].vocab
    for layout in ("audiofolder", "disk"):
        other = tables[layout].train
        assert [str(i).rsplit("/", 1)[-1] for i in other.column("id")] == timit.column("id")
        for a, b in zip(timit, other, strict=True):
            assert a["text"] == b["text"] and a["labels"].tolist() == b["labels"].tolist()
            assert a["length"] == b["length"]  # 22.05 kHz back to 16 kHz: the same number of samples
            if layout == "disk":
                np.testing.assert_array_equal(a["input_values"], b["input_values"])
            else:  # resampled twice (16 -> 22.05 -> 16 kHz): the same signal, up to the filters
                assert np.corrcoef(a["input_values"], b["input_values"])[0, 1] > 0.99


def test_a_copy_of_each_layout_in_another_folder_is_the_prepared_corpus(
    corpora: dict[str, Path], tmp_path: Path
) -> None:
    """The cache follows the corpus, not its folder: a copy elsewhere (file times kept) is a hit."""
    for layout in LAYOUTS:
        staged = shutil.copytree(corpora[layout], tmp_path / "scratch" / layout)
        first = prepare(
            corpus_sources(DataSection(dir=str(corpora[layout]), format=layout)), tmp_path / "cache", "clean"
        )
        again = prepare(
            corpus_sources(DataSection(dir=str(staged), format=layout)), tmp_path / "cache", "clean"
        )
        assert (layout, first.cache_hit, again.cache_hit) == (layout, False, True)
        assert again.train.column("id") == first.train.column("id")
    # Another saved dataset with the same transcripts and datasets fingerprint (one that follows transforms,
    # not data) but other audio is not that corpus.
    other = generate_corpus(tmp_path / "other", train=64, test=16, seed=1, layout="disk", sample_rate=22050)
    for split in ("train", "test"):
        shutil.copy(corpora["disk"] / split / "state.json", other / split / "state.json")
    other_data = DataSection(dir=str(other), format="disk")
    assert prepare(corpus_sources(other_data), tmp_path / "cache", "clean").cache_hit is False


def test_a_checkpoint_moved_elsewhere_finds_the_corpus_it_prepared(
    corpora: dict[str, Path], tmp_path: Path
) -> None:
    """A table's checks follow the conv stack, not the checkpoint's folder: a local checkpoint copied
    elsewhere (or built from the same layout in `model.config`) is a hit; one with another stride is not."""
    from transformers import Wav2Vec2Config

    config = load_recipe(RECIPES / "smoke.yaml").model.config or {}
    Wav2Vec2Config(**config).save_pretrained(tmp_path / "checkpoint")
    Wav2Vec2Config(**{**config, "conv_stride": [5, 8, 4]}).save_pretrained(tmp_path / "strided")

    def recipe_from(*model: str) -> Recipe:
        where = [f"data.dir={corpora['timit']}", f"data.cache_dir={tmp_path / 'cache'}"]
        return load_recipe(RECIPES / "smoke.yaml", [*where, "data.generate=null", *model])

    def from_folder(folder: Path) -> Recipe:
        return recipe_from("model.config=null", f"model.name_or_path={folder}")

    assert prepare_corpus(from_folder(tmp_path / "checkpoint")).cache_hit is False
    moved = Path(shutil.copytree(tmp_path / "checkpoint", tmp_path / "elsewhere" / "checkpoint"))
    assert is_prepared(from_folder(moved)) and prepare_corpus(from_folder(moved)).cache_hit
    assert is_prepared(recipe_from())
    assert not is_prepared(from_folder(tmp_path / "strided"))


@pytest.mark.slow
def test_audiofolder_and_disk_corpora_train_like_the_timit_layout(
    corpora: dict[str, Path], tmp_path: Path, trained_smoke: Path
) -> None:
    # The TIMIT-layout baseline: the same utterances (tones_corpus) and settings, trained once per session.
    results = {"timit": [r for r in read_run_logs(trained_smoke) if r["kind"] == "eval"][-1]}
    for layout in ("audiofolder", "disk"):
        run_dir = tmp_path / layout
        command = engine_command(run_dir, corpora[layout], 1, f"data.format={layout}", *TRAINED_SMOKE)
        done = subprocess.run(command, env=python_env(OMP_NUM_THREADS="2"), capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        results[layout] = [r for r in read_run_logs(run_dir) if r["kind"] == "eval"][-1]
    assert results["disk"]["eval_loss"] == results["timit"]["eval_loss"]  # the very same samples
    assert results["audiofolder"]["eval_loss"] == pytest.approx(results["timit"]["eval_loss"], rel=0.1)
    assert abs(results["audiofolder"]["wer"] - results["timit"]["wer"]) <= 0.25  # mid-training, WER swings
    assert results["timit"]["eval_loss"] < 1.5 and results["timit"]["wer"] < 1.0  # it learned something


def test_bad_metadata_names_the_file_and_the_column(corpora: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "af"
    shutil.copytree(corpora["audiofolder"], folder)
    metadata = folder / "train" / "metadata.csv"
    original = metadata.read_text()
    for split in ("train", "test"):
        renamed = folder / split / "metadata.csv"
        renamed.write_text(renamed.read_text().replace("file_name,text", "file_name,sentence", 1))
    data = DataSection(dir=str(folder), format="audiofolder")
    with pytest.raises(DataError, match=rf"{metadata}: no column 'text' \(columns: file_name, sentence\)"):
        count_utterances(data)
    assert count_utterances(data.model_copy(update={"text_column": "sentence"}))["train"] == 64
    test_metadata = folder / "test" / "metadata.csv"
    test_metadata.write_text(test_metadata.read_text().replace("file_name,sentence", "file_name,text", 1))
    lines = original.splitlines()
    lines[3] = "missing.wav," + lines[3].split(",", 1)[1]
    metadata.write_text("\n".join(lines) + "\n")
    assert (
        count_utterances(data)["train"] == 64
    )  # a missing file is its utterance's problem, not the layout's
    (missing,) = cheap_problems(data)  # found before anything is queued (preflight)
    assert (
        missing.line()
        == f"{folder / 'train' / 'missing.wav'}: the file does not exist ({metadata}:4, "
        + ("file_name 'missing.wav')")
    )
    done = subprocess.run(  # the engine says the same in one line
        [
            PYTHON,
            "-m",
            "asrlaunch",
            "train",
            str(RECIPES / "smoke.yaml"),
            "--run-dir",
            str(tmp_path / "run"),
            f"data.dir={folder}",
            "data.format=audiofolder",
            f"data.cache_dir={tmp_path / 'cache'}",
        ],
        env=python_env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: {missing.line()} (the only bad utterance, listed in ")


def test_every_bad_utterance_is_named_at_once_or_left_out(corpora: dict[str, Path], tmp_path: Path) -> None:
    """A header-only WAV, an empty transcript and a missing file: one error line with the count and the
    first ones, all three in the list file; with `data.skip_bad=true` the run trains on the rest and the model
    card says how many were left out."""
    import csv
    import shutil

    import soundfile

    folder = tmp_path / "af"
    shutil.copytree(corpora["audiofolder"], folder)
    metadata = folder / "train" / "metadata.csv"
    rows = list(csv.reader(metadata.open()))
    soundfile.write(folder / "train" / rows[1][0], np.zeros(0), 22050)  # a header and no samples
    rows[2][1] = "?!"  # nothing left once normalised
    rows[3][0] = "missing.wav"
    with metadata.open("w", newline="") as file:
        csv.writer(file).writerows(rows)
    data = DataSection(dir=str(folder), format="audiofolder")
    reasons = sorted(p.reason.split(" (")[0] for p in cheap_problems(data))
    assert reasons == ["no samples", "the file does not exist", "the transcript is empty after normalisation"]

    def train(*overrides: str) -> subprocess.CompletedProcess[str]:
        command = engine_command(
            tmp_path / "run",
            folder,
            1,
            "data.format=audiofolder",
            "train.max_steps=2",
            "eval.steps=2",
            *overrides,
        )
        return subprocess.run(command, env=python_env(OMP_NUM_THREADS="2"), capture_output=True, text=True)

    refused = train()
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    (line,) = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert line.startswith(f"error: 3 bad utterances in {folder}: ") and "data.skip_bad=true" in line
    listed = Path(line.split("every one is listed in ")[1].split(";")[0]).read_text().splitlines()
    assert listed[0] == "split\tid\tfile\treason" and len(listed) == 4
    assert {row.split("\t")[3].split(" (")[0] for row in listed[1:]} == set(reasons)

    kept = train("data.skip_bad=true")
    assert kept.returncode == 0, kept.stderr[-3000:]
    (start,) = [r for r in read_run_logs(tmp_path / "run") if r["kind"] == "meta" and "plan" in r]
    assert start["skipped_utterances"] == 3 and start["plan"]["train_samples"] == 61
    collected = subprocess.run(
        [PYTHON, "-m", "asrlaunch", "collect", str(tmp_path / "run")],
        env=python_env(),
        capture_output=True,
        text=True,
    )
    assert collected.returncode == 0, collected.stderr
    assert (
        "Train 61 utterances (3 bad utterances left out: data.skip_bad)"
        in (tmp_path / "run" / "final" / "README.md").read_text()
    )


def test_split_names_are_the_corpus_own(corpora: dict[str, Path], tmp_path: Path) -> None:
    """`data.eval_split=validation` on an audiofolder whose evaluation folder is validation/: it trains and
    evaluates on it."""
    import shutil

    folder = tmp_path / "af"
    shutil.copytree(corpora["audiofolder"], folder)
    (folder / "test").rename(folder / "validation")
    data = DataSection(dir=str(folder), format="audiofolder", eval_split="validation")
    assert count_utterances(data) == {"train": 64, "test": 16}
    run_dir = tmp_path / "run"
    command = engine_command(
        run_dir,
        folder,
        1,
        "data.format=audiofolder",
        "data.eval_split=validation",
        "train.max_steps=2",
        "eval.steps=2",
    )
    done = subprocess.run(command, env=python_env(OMP_NUM_THREADS="2"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    (evaluation,) = [r for r in read_run_logs(run_dir) if r["kind"] == "eval" and r["step"] == 2]
    assert evaluation["eval_samples"] == 16
    with pytest.raises(DataError, match=r"data\.train_split, data\.eval_split name the splits"):
        count_utterances(DataSection(dir=str(folder), format="audiofolder"))


def test_table_rows_across_record_batches_are_the_rows_written(tmp_path: Path) -> None:
    from asrlaunch.data.table import ROWS_PER_BATCH, Table, TableWriter

    rng = np.random.default_rng(0)
    written: list[dict[str, Any]] = []
    writer = TableWriter(tmp_path / "t.arrow")
    for index in range(2 * ROWS_PER_BATCH + 7):  # three record batches, the last one partial
        audio = rng.standard_normal(int(rng.integers(1, 50))).astype(np.float32)
        labels = rng.integers(0, 30, int(rng.integers(1, 9))).astype(np.int32)
        row = {"id": f"u{index}", "text": "x", "input_values": audio, "labels": labels, "length": len(audio)}
        writer.write(row)
        written.append(row)
    writer.close()
    table = Table(tmp_path / "t.arrow")
    picked = [0, ROWS_PER_BATCH - 1, ROWS_PER_BATCH, len(written) - 1, 5, ROWS_PER_BATCH]
    rows = table.rows(picked, ("input_values", "labels", "id"))
    for i, index in enumerate(picked):
        np.testing.assert_array_equal(rows["input_values"][i], written[index]["input_values"])
        np.testing.assert_array_equal(rows["labels"][i], written[index]["labels"])
        assert rows["id"][i] == written[index]["id"]
    assert [len(a) for a in table.arrays("labels")] == [len(r["labels"]) for r in written]
    with pytest.raises(IndexError):
        table.arrays("labels", [len(written)])


def test_the_cache_follows_transcripts_and_checks_and_bad_metadata_says_what_to_fix(
    corpora: dict[str, Path], tmp_path: Path
) -> None:
    """An edited transcript (the same characters) is a new table, not the cached one with the old text; so
    are other checks. A spreadsheet's byte-order mark reads; Latin-1 and a short row are named."""
    import shutil

    from asrlaunch.data.corpus import Checks
    from asrlaunch.data.text import transcript

    folder = tmp_path / "af"
    shutil.copytree(corpora["audiofolder"], folder)
    data = DataSection(dir=str(folder), format="audiofolder")
    first = prepare(corpus_sources(data), tmp_path / "cache", "clean")
    metadata = folder / "train" / "metadata.csv"
    lines = metadata.read_text().splitlines()
    name, text = lines[1].split(",", 1)
    words = text.split()
    assert len(set(words)) > 1
    lines[1] = f"{name},{' '.join(reversed(words))}"
    metadata.write_text("\ufeff" + "\n".join(lines) + "\n")  # and a byte-order mark
    edited = prepare(corpus_sources(data), tmp_path / "cache", "clean")
    assert first.cache_hit is False and edited.cache_hit is False
    assert edited.train.column("text")[0] == " ".join(reversed(first.train.column("text")[0].split()))
    strict = prepare(corpus_sources(data), tmp_path / "cache", "clean", checks=Checks(key="strict"))
    assert strict.cache_hit is False
    assert transcript("yes|no", "clean").target == "yes no"  # a literal `|` is a word break, not a label

    metadata.write_bytes(("\n".join(lines[:2]) + ",\n" + "caf\xe9.wav\n").encode("latin-1"))
    with pytest.raises(DataError, match=rf"{metadata}: not UTF-8 text"):
        count_utterances(data)
    metadata.write_text("\n".join([*lines[:3], lines[3].split(",", 1)[0]]) + "\n")  # a row without its text
    (short,) = [p for p in cheap_problems(data) if "no transcript" in p.reason]
    assert "fewer cells than the header" in short.reason


def test_a_disk_corpus_whose_ids_repeat_keeps_every_utterance_apart(tmp_path: Path) -> None:
    """timit_asr's `id` names the sentence (SA1), read by many speakers: a bad one must not take the rest."""
    import datasets

    audio = [{"array": np.zeros(16000, dtype=np.float32), "sampling_rate": 16000}] * 3
    split = datasets.Dataset.from_dict({"audio": audio, "text": ["a b", "", "c d"], "id": ["SA1"] * 3})
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "disk"))
    data = DataSection(dir=str(tmp_path / "disk"), format="disk")
    sources = corpus_sources(data)
    assert [s.id for s in sources["train"]] == ["SA1@0", "SA1@1", "SA1@2"]
    corpus = prepare(sources, tmp_path / "cache", "clean", skip_bad=True)
    assert (len(corpus.train), corpus.skipped) == (2, 2)  # the empty transcript, in each split
    empty = DataSection(dir=str(tmp_path / "disk"), format="disk", max_train_samples=2)
    only_bad = {**corpus_sources(empty), "train": corpus_sources(empty)["train"][1:2]}
    with pytest.raises(DataError, match="no usable utterance is left in the train split"):
        prepare(only_bad, tmp_path / "cache", "clean", skip_bad=True)


def test_listing_a_disk_corpus_leaves_its_audio_on_disk(tmp_path: Path) -> None:
    """Every rank lists the sources at every start: 100 s of audio (6.4 MB of samples) must stay in the
    memory-mapped table until an utterance is read."""
    import tracemalloc

    import datasets
    import pyarrow as pa

    rows = [{"array": np.full(16000, i / 100, dtype=np.float32), "sampling_rate": 16000} for i in range(100)]
    split = datasets.Dataset.from_dict({"audio": rows, "text": ["a b"] * 100})
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "disk"))
    data = DataSection(dir=str(tmp_path / "disk"), format="disk")
    corpus_sources(data)  # datasets' own first-use imports and caches, outside the measure
    arrow_before = pa.total_allocated_bytes()
    tracemalloc.start()
    sources = corpus_sources(data)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 2_000_000, peak  # Python objects: no decoded audio
    assert pa.total_allocated_bytes() - arrow_before < 2_000_000  # Arrow buffers: nothing read into memory
    samples, rate = sources["train"][42].read()
    assert rate == 16000 and samples.shape == (16000,) and samples[0] == pytest.approx(0.42)


def test_a_cache_dir_expands_home_and_variables_where_it_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`data.cache_dir: $SLURM_TMPDIR/asr` is each node's own disk, read on the node; a variable unset there
    is an error that names it, not a folder called `$SLURM_TMPDIR`."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NODE_DISK", "/scratch/node7")
    recipe = load_recipe(RECIPES / "smoke.yaml", ["data.cache_dir=~/${NODE_DISK}x/$JOB_TMP/asr"])
    assert unset_variables(recipe) == ["JOB_TMP"] and not is_prepared(recipe)
    with pytest.raises(DataError, match=r"data.cache_dir: \$JOB_TMP is not set on "):
        cache_dir(recipe)
    monkeypatch.setenv("JOB_TMP", "42")
    assert cache_dir(recipe) == tmp_path / "scratch/node7x/42/asr" and unset_variables(recipe) == []
    # set at submission and no job's own: a preparation job can fill it
    assert job_local_variables(recipe) == []
    monkeypatch.setenv("SLURM_TMPDIR", "/tmp/job7")  # set where an salloc submits, but each job's own
    in_job = load_recipe(RECIPES / "smoke.yaml", ["data.cache_dir=$SLURM_TMPDIR/asr"])
    assert job_local_variables(in_job) == ["SLURM_TMPDIR"] and cache_dir(in_job) == Path("/tmp/job7/asr")


def test_each_node_has_one_first_rank_whatever_the_placement_and_a_wait_has_an_end() -> None:
    """SLURM's cyclic distribution puts rank 1 on the second node: a node's first rank is its lowest."""
    cyclic = ("gpu07", "gpu08", "gpu07", "gpu08")
    firsts = [CorpusPeers(rank, cyclic).is_node_main for rank in range(4)]
    assert firsts == [True, True, False, False] and CorpusPeers(3, cyclic).nodes == ["gpu07", "gpu08"]
    late = CorpusPeers(1, cyclic, deadline=time.time() - 1)
    with pytest.raises(TimeoutError, match="gave up waiting for rank 0's corpus"):
        late.wait_for(lambda: False, "rank 0's corpus", on_progress=lambda: None)
