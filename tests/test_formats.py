"""Datasets beyond TIMIT: the same generated utterances as TIMIT's layout, an audiofolder at 22.05 kHz (the
loader resamples) and a dataset saved to disk prepare alike and train alike; bad metadata says what to fix."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from asrlaunch.core.logs import read_run_logs
from asrlaunch.core.recipe import DataSection
from asrlaunch.data.corpus import DataError, prepare
from asrlaunch.data.sources import corpus_sources, count_utterances
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
    timit = tables["timit"].train.with_format("numpy")
    assert tables["audiofolder"].vocab == tables["disk"].vocab == tables["timit"].vocab
    for layout in ("audiofolder", "disk"):
        other = tables[layout].train.with_format("numpy")
        assert [str(i).rsplit("/", 1)[-1] for i in other["id"]] == list(timit["id"])
        for a, b in zip(timit, other, strict=True):
            assert a["text"] == b["text"] and a["labels"].tolist() == b["labels"].tolist()
            assert a["length"] == b["length"]  # 22.05 kHz back to 16 kHz: the same number of samples
            if layout == "disk":
                np.testing.assert_array_equal(a["input_values"], b["input_values"])
            else:  # resampled twice (16 -> 22.05 -> 16 kHz): the same signal, up to the filters
                assert np.corrcoef(a["input_values"], b["input_values"])[0, 1] > 0.99


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
    lines = original.splitlines()
    lines[3] = "missing.wav," + lines[3].split(",", 1)[1]
    metadata.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{metadata}:4: file_name 'missing.wav' does not exist"):
        count_utterances(data)
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
    assert [line for line in done.stderr.splitlines() if line.startswith("error:")] == [
        f"error: {metadata}:4: file_name 'missing.wav' does not exist beside it"
    ]
