"""Real training on CPU: one process, then two gloo processes under torchrun."""

from __future__ import annotations

import itertools
import json
import subprocess
from pathlib import Path

import pytest
from transformers import Wav2Vec2CTCTokenizer

from asrlaunch.core.logs import read_run_logs
from asrlaunch.core.rundir import RunDir
from asrlaunch.results.merge import run_result
from asrlaunch.results.report import write_run_report

from .conftest import engine_command, python_env

pytestmark = pytest.mark.slow


def train(run_dir: Path, corpus: Path, processes: int, *overrides: str, fault: str = "") -> list[dict]:
    """Run the engine as users do: plain Python for one process, torchrun (gloo) for more."""
    command = engine_command(
        run_dir,
        corpus,
        processes,
        "train.max_micro_batch_size=4",
        "logging.sample_ids=true",
        "eval.at_start=false",
        *overrides,
    )
    done = subprocess.run(
        command,
        env=python_env(OMP_NUM_THREADS="1", ASRLAUNCH_FAULT=fault),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return read_run_logs(run_dir)


def by_step(records: list[dict], kind: str) -> dict[int, list[dict]]:
    steps: dict[int, list[dict]] = {}
    for record in records:
        if record["kind"] == kind:
            steps.setdefault(record["step"], []).append(record)
    return steps


def test_world_size_does_not_change_samples_or_losses(tmp_path: Path, tones_corpus: Path) -> None:
    common = ("train.max_steps=10", "logging.steps=1", "eval.steps=10")
    one = train(tmp_path / "w1", tones_corpus, 1, *common)
    two = train(tmp_path / "w2", tones_corpus, 2, *common)

    meta = by_step(two, "meta")[0]
    assert sorted(r["rank"] for r in meta) == [0, 1]
    assert all(
        r["world_size"] == 2 and r["plan"]["micro_batch"] == 4 and r["plan"]["grad_accum"] == 4 for r in meta
    )
    assert by_step(one, "meta")[0][0]["plan"]["grad_accum"] == 8

    train_one, train_two = by_step(one, "train"), by_step(two, "train")
    assert sorted(train_one) == sorted(train_two) == list(range(1, 11))
    for step in range(1, 11):
        (single,) = train_one[step]
        pair = train_two[step]
        assert sorted(single["sample_ids"]) == sorted(pair[0]["sample_ids"]) == sorted(pair[1]["sample_ids"])
        mean_two = sum(r["loss"] for r in pair) / 2  # equal micro-batches: the rank mean is the global mean
        assert mean_two == pytest.approx(single["loss"], rel=1e-5)
        assert pair[0]["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-4)

    eval_two = by_step(two, "eval")[10]
    assert [r["rank"] for r in eval_two] == [0]  # WER is computed once
    assert eval_two[0]["eval_samples"] == 16
    assert eval_two[0]["wer"] == pytest.approx(by_step(one, "eval")[10][0]["wer"])


def test_the_reference_order_with_its_partial_batch_is_the_same_on_1_2_and_4_processes(
    tmp_path: Path, tones_corpus: Path
) -> None:
    """64 utterances at a global batch of 12: 6 steps per epoch, the last of 4 samples. On 4 processes rank 0
    computes 3 of them, rank 1 one, ranks 2 and 3 none; each micro-batch's loss is weighted by its samples, so
    the step's loss and gradient are the mean over the 4, as one process computes them."""
    common = (
        "data.order=reference",
        "train.global_batch_size=12",
        "train.max_micro_batch_size=3",
        "train.max_steps=8",
        "logging.steps=1",
        "eval.steps=100",
    )
    runs = {
        world: by_step(train(tmp_path / f"w{world}", tones_corpus, world, *common), "train")
        for world in (1, 2, 4)
    }
    for world, steps in runs.items():
        assert sorted(steps) == list(range(1, 9)), world
        for step, records in steps.items():
            (single,) = runs[1][step]
            size = 4 if step == 6 else 12  # the partial batch closes epoch 0
            assert len(single["sample_ids"]) == size
            assert all(r["sample_ids"] == single["sample_ids"] for r in records)  # the same samples, in order
            mean = sum(r["loss"] for r in records) / world  # the weighted rank losses: the batch's mean
            assert mean == pytest.approx(single["loss"], rel=1e-5), (world, step)
            assert all(r["run_loss"] == pytest.approx(mean, abs=2e-6) for r in records), (world, step)
            assert records[0]["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-4), (world, step)


def test_two_process_run_writes_both_rank_logs_and_the_final_model(
    tmp_path: Path, tones_corpus: Path
) -> None:
    run_dir = tmp_path / "run"
    records = train(run_dir, tones_corpus, 2, "train.max_steps=4", "logging.steps=2", "eval.steps=4")
    for rank in (0, 1):
        lines = [json.loads(x) for x in (run_dir / "logs" / f"rank{rank}.jsonl").read_text().splitlines()]
        kinds = [r["kind"] for r in lines]
        assert kinds.count("meta") == 1 and kinds.count("train") == 2
        meta = lines[0]
        assert meta["world_size"] == 2 and meta["rank"] == rank and meta["attempt"] == 0
        assert {"torch", "transformers", "datasets", "accelerate"} <= set(meta["versions"])
        assert meta["recipe"]["train"]["max_steps"] == 4
        for record in lines:
            assert {"kind", "step", "epoch", "rank", "attempt", "time"} <= set(record)
        for record in (r for r in lines if r["kind"] == "train"):
            assert {"loss", "lr", "grad_norm", "samples_per_s", "nonfinite_skipped"} <= set(record)
            assert record["ctc_infinite"] == 0  # the smoke model leaves every transcript enough frames
            assert "max_memory_gib" not in record  # a GPU figure
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(evals) == 1 and evals[0]["rank"] == 0 and {"eval_loss", "wer"} <= set(evals[0])
    final = run_dir / "final"
    assert (final / "model.safetensors").exists() and (final / "vocab.json").exists()
    write_run_report(run_result(RunDir(run_dir)))
    card = (final / "README.md").read_text()
    lines = card.split("used during training:\n")[1].split("\n\n")[0].splitlines()
    assert lines[:13] == [  # transformers' extract_hyperparameters_from_trainer, in its order
        "- learning_rate: 0.003",
        "- train_batch_size: 4",
        "- eval_batch_size: 1",
        "- seed: 42",
        "- distributed_type: multi-GPU",
        "- num_devices: 2",
        "- gradient_accumulation_steps: 4",
        "- total_train_batch_size: 32",
        "- total_eval_batch_size: 2",
        "- optimizer: Adam with betas=(0.9,0.999) and epsilon=1e-08",
        "- lr_scheduler_type: linear",
        "- lr_scheduler_warmup_steps: 50",
        "- training_steps: 4",
    ]
    assert [line.split(":")[0] for line in lines[13:]] == [
        "- nodes",
        "- attempts",
        "- restarts (resumed from step)",
        "- stops",
        "- wall_time_s",
        "- device_hours",
        "- goodput",
    ]
    # the card's vocab_size: the tokenizer's length, <s> and </s> (added tokens, not in vocab.json) included
    tokenizer = Wav2Vec2CTCTokenizer.from_pretrained(final)
    assert json.loads((final / "config.json").read_text())["vocab_size"] == len(tokenizer)
    assert len(tokenizer) == len(json.loads((final / "vocab.json").read_text())) + 2
    assert json.loads((run_dir / "plan.json").read_text())["world_size"] == 2


def test_the_other_ranks_wait_for_rank_0s_corpus_longer_than_a_collective_may_last(
    tmp_path: Path, tones_corpus: Path
) -> None:
    """Rank 0 prepares the corpus (a big one takes long: 25 s more here) while the others wait for its word
    in the run directory, not in a collective that would time out (after 10 s here)."""
    run_dir = tmp_path / "run"
    overrides = ("train.max_steps=2", "train.collective_timeout_s=10", f"data.cache_dir={tmp_path / 'cache'}")
    stall = "stall@step=0,rank=0,phase=prepare,seconds=25"
    records = train(run_dir, tones_corpus, 2, *overrides, fault=stall)
    (fault,) = [r for r in records if r.get("event") == "fault"]
    assert fault["rank"] == 0 and "phase=prepare" in fault["fault"]
    assert sorted(r["rank"] for r in records if r["kind"] == "train" and r["step"] == 2) == [0, 1]
    assert len(list(RunDir(run_dir).heartbeats_dir.glob("corpus-attempt0-*.ready"))) == 1


def test_diverging_run_skips_nonfinite_steps_then_stops_with_a_clear_error(
    tmp_path: Path, tones_corpus: Path
) -> None:
    command = engine_command(
        tmp_path / "run",
        tones_corpus,
        1,
        "train.lr=1e12",
        "train.warmup_steps=0",
        "train.max_grad_norm=null",
        "train.max_consecutive_nonfinite=3",
        "train.max_steps=40",
        "logging.steps=1",
        "eval.at_start=false",
    )
    done = subprocess.run(
        command, env=python_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600
    )
    assert done.returncode != 0
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "error: 3 optimizer steps in a row had non-finite gradients" in done.stderr
    records = [r for r in read_run_logs(tmp_path / "run") if r["kind"] == "train"]
    assert records and records[-1]["nonfinite_skipped"] >= 2
    # As the Trainer: a skipped step does not advance the schedule (linear decay without warmup: the lr
    # falls at every applied step and stays put at every skipped one).
    for before, after in itertools.pairwise(records):
        skipped = after["nonfinite_skipped"] > before["nonfinite_skipped"]
        assert (after["lr"] == before["lr"]) if skipped else (after["lr"] < before["lr"])


def test_ctc_min_frames_counts_a_blank_between_repeats() -> None:
    from asrlaunch.engine.model import ctc_min_frames

    assert ctc_min_frames([]) == 0
    assert ctc_min_frames([1, 2, 3]) == 3
    assert ctc_min_frames([1, 1, 2, 2, 2]) == 5 + 3  # "aabbb": a blank inside each pair of equal labels


def test_utterances_too_short_for_their_transcript_are_counted_not_fatal(
    tmp_path: Path, tones_corpus: Path
) -> None:
    """A conv stack that downsamples 8x more leaves fewer CTC frames than characters: such utterances have an
    infinite loss, which ctc_zero_infinity zeroes; the run counts them and trains on."""
    records = train(
        tmp_path / "run",
        tones_corpus,
        1,
        "train.max_steps=2",
        "logging.steps=1",
        "model.config.conv_dim=[32, 32, 32, 32]",
        "model.config.conv_kernel=[10, 8, 8, 8]",
        "model.config.conv_stride=[5, 8, 8, 8]",
    )
    steps = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in steps] == [1, 2]
    assert 0 < steps[0]["ctc_infinite"] < steps[1]["ctc_infinite"] <= 64
    assert all(r["loss"] is not None for r in steps) and steps[-1]["nonfinite_skipped"] == 0
