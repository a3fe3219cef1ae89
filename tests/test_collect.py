"""The collector: merging ranks and attempts, the card's table format, the model card and plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from asrlaunch.results.merge import MixedRunsError, merge_records, read_run
from asrlaunch.results.table import NO_LOG, ResultRow, compare_tables, parse_table, render_table, result_rows

from .conftest import PYTHON, ROOT, python_env

# The reference card (wav2vec2-base.timit_asr.32), kept inside the repository so any clone can run these.
REFERENCE = Path(__file__).parent / "fixtures" / "reference-model-card.md"
GOLDEN = Path(__file__).parent / "golden"
SPE = 10  # steps per epoch of the synthetic run


def meta(rank: int, attempt: int, resumed_from: int | None, name: str = "synthetic") -> dict:
    return {
        "kind": "meta",
        "step": resumed_from or 0,
        "epoch": 0.0,
        "rank": rank,
        "attempt": attempt,
        "time": 1000.0 + 100 * attempt,
        "world_size": 4,
        "resumed_from": resumed_from,
        "nodes": 2,
        "device": "cpu",
        "versions": {"torch": "2.13.0", "transformers": "5.24.0"},
        "plan": {
            "global_batch": 32,
            "world_size": 4,
            "micro_batch": 8,
            "grad_accum": 1,
            "train_samples": 320,
            "steps_per_epoch": SPE,
            "total_steps": 16,
            "epochs": 1.6,
            "warmup_steps": 2,
        },
        "recipe": {
            "run": {"name": name},
            "model": {"name_or_path": "facebook/wav2vec2-base", "config": None},
            "data": {"dir": "/data/TIMIT", "generate": None},
            "eval": {"batch_size": 1},
            "train": {
                "lr": 1e-4,
                "seed": 42,
                "adam_betas": [0.9, 0.999],
                "adam_eps": 1e-8,
                "optimizer": "adamw",
                "lr_scheduler": "linear",
                "warmup_steps": 2,
                "epochs": 1.6,
                "max_steps": None,
                "mixed_precision": "fp16",
            },
        },
    }


def train(step: int, attempt: int, rank: int) -> dict:
    loss = round(5.0 - 0.25 * step + 0.01 * attempt + 0.002 * rank, 6)
    return {
        "kind": "train",
        "step": step,
        "epoch": step / SPE,
        "rank": rank,
        "attempt": attempt,
        "time": 1000.0 + 100 * attempt + step,
        "loss": loss,
        "lr": 1e-4,
        "grad_norm": 1.0,
        "samples_per_s": 1.0,
    }


def evaluation(step: int, attempt: int) -> dict:
    return {
        "kind": "eval",
        "step": step,
        "epoch": step / SPE,
        "rank": 0,
        "attempt": attempt,
        "time": 1000.0 + 100 * attempt + step,
        "eval_loss": round(4.0 - 0.2 * step + 0.001 * attempt, 6),
        "wer": round(1.0 - 0.05 * step + 0.0001 * attempt, 6),
    }


def synthetic_run(run_dir: Path) -> None:
    """4 ranks (rank 3's log lost), 3 attempts: 0 -> step 10 (checkpoint 6), 1 resumes at 6 and reaches 12
    (checkpoint 10), rank 1 killed mid-line; 2 resumes at 10 and finishes at 16. Evals every 4 steps."""
    (run_dir / "logs").mkdir(parents=True)
    plan = {
        0: (None, [2, 4, 6, 8, 10], [0, 4, 8]),
        1: (6, [8, 10, 12], [8, 12]),
        2: (10, [12, 14, 16], [12, 16]),
    }
    for rank in (0, 1, 2):
        lines = []
        for attempt, (resumed, train_steps, eval_steps) in plan.items():
            lines.append(meta(rank, attempt, resumed))
            for step in sorted(set(train_steps) | set(eval_steps)):
                if step in train_steps:
                    lines.append(train(step, attempt, rank))
                if step in eval_steps and rank == 0:
                    lines.append(evaluation(step, attempt))
            if attempt < 2:  # the stop event each interrupted attempt logs
                lines.append({**meta(rank, attempt, None), "step": train_steps[-1], "event": "preemption"})
                for key in ("plan", "recipe", "versions", "resumed_from"):
                    lines[-1].pop(key)
        text = "".join(json.dumps(line) + "\n" for line in lines)
        if rank == 1:
            text += json.dumps(train(14, 2, 1))[:25]  # a writer killed mid-line
        (run_dir / "logs" / f"rank{rank}.jsonl").write_text(text)
    (run_dir / "recipe.yaml").write_text("run: {name: synthetic}\n")


def test_ranks_and_attempts_merge_into_the_hand_checked_table(tmp_path: Path) -> None:
    synthetic_run(tmp_path)
    with pytest.warns(UserWarning) as caught:
        run = read_run(tmp_path)
    messages = " ".join(str(w.message) for w in caught)
    assert "no log of rank 3" in messages and "truncated last line" in messages
    assert run.restarts == [6, 10]
    rows = result_rows(run)
    assert render_table([r.values() for r in rows]) == (GOLDEN / "collect_4ranks_3attempts.md").read_text()
    assert sorted(run.train) == [2, 4, 6, 8, 10, 12, 14, 16]  # no step twice


def test_replayed_steps_equal_an_uninterrupted_run() -> None:
    straight = [meta(0, 0, None), *(train(s, 0, 0) for s in range(1, 9)), evaluation(4, 0), evaluation(8, 0)]
    # Attempt 0's steps 4-6 and its evaluation at 4 were trained again by attempt 1 from the checkpoint at 3:
    # the replayed records win (attempt 0's differ here, as a non-deterministic GPU's would).
    interrupted = [
        meta(0, 0, None),
        *(train(s, 0, 0) for s in range(1, 4)),
        *({**train(s, 0, 0), "loss": 99.0} for s in range(4, 7)),
        {**evaluation(4, 0), "eval_loss": 99.0, "wer": 0.99},
        meta(0, 1, 3),
        *({**train(s, 1, 0), "attempt": 1, "loss": train(s, 0, 0)["loss"]} for s in range(4, 9)),
        {**evaluation(4, 0), "attempt": 1},
        {**evaluation(8, 0), "attempt": 1},
    ]
    a, b = merge_records(straight), merge_records(interrupted)
    assert render_table([r.values() for r in result_rows(a)]) == render_table(
        [r.values() for r in result_rows(b)]
    )
    assert b.restarts == [3]


def test_logs_of_two_runs_are_refused() -> None:
    with pytest.raises(MixedRunsError, match=r"different runs .*differ in run\.name\)"):
        merge_records([meta(0, 0, None), meta(1, 0, None, name="other")])
    # two elements of a sweep share their run name: their recipes still tell them apart
    first, second = meta(0, 0, None), meta(0, 1, 4)
    second["recipe"] = {**first["recipe"], "train": {**first["recipe"]["train"], "lr": 3e-4}}
    with pytest.raises(MixedRunsError, match=r"differ in train\.lr\)"):
        merge_records([first, second])
    # a resume may change the job shape, the stop step and the ZeRO stage: still one run
    second["recipe"] = {
        **first["recipe"],
        "cluster": {"nodes": 4},
        "train": {**first["recipe"]["train"], "max_steps": 99, "zero_stage": 1},
    }
    assert merge_records([first, second]).restarts == [4]


def test_reference_table_roundtrips_byte_for_byte() -> None:
    card = REFERENCE.read_text()
    headers, rows = parse_table(card)
    assert headers == ["Training Loss", "Epoch", "Step", "Validation Loss", "Wer"]
    assert len(rows) == 29 and rows[0] == ["3.2001", "0.69", "100", "3.1346", "1.0"]
    table = render_table(rows, headers)
    assert table in card
    assert card.index(table) == card.index("| Training Loss")


def test_table_matches_transformers_modelcard_field_by_field(tmp_path: Path) -> None:
    from transformers.modelcard import make_markdown_table, parse_log_history

    synthetic_run(tmp_path)
    with pytest.warns(UserWarning):
        run = read_run(tmp_path)
    history: list[dict] = []
    for step in sorted(set(run.train) | set(run.evals)):
        epoch = round(step / SPE, 2)
        if step in run.train:
            history.append({"loss": round(run.train[step], 4), "epoch": epoch, "step": step})
        if step in run.evals:
            history.append(
                {
                    "eval_loss": run.evals[step]["eval_loss"],
                    "eval_wer": run.evals[step]["wer"],
                    "eval_runtime": 1.0,
                    "epoch": epoch,
                    "step": step,
                }
            )
    history.append({"train_runtime": 10.0, "epoch": 1.6, "step": 16})
    _, lines, _ = parse_log_history(history)
    rows = result_rows(run)
    assert len(lines) == len(rows)
    for line, row in zip(lines, rows, strict=True):
        assert list(line) == ["Training Loss", "Epoch", "Step", "Validation Loss", "Wer"]
        assert tuple(line.values()) == row.values()
    assert make_markdown_table(lines) == render_table([r.values() for r in rows])


def test_compare_shows_every_column_of_the_reference_beside_ours() -> None:
    rows = [ResultRow(3.1, 0.69, 100, 3.0, 1.0), ResultRow(NO_LOG, 1.38, 200, 2.5, 0.9)]
    lines = compare_tables(REFERENCE.read_text(), rows).splitlines()
    assert [cell.strip() for cell in lines[0].split("|")[1:]] == ["train loss", "epoch", "val loss", "WER"]
    by_step = {line.split("|")[0].strip(): [c.split() for c in line.split("|")[1:]] for line in lines[2:]}
    assert by_step["100"] == [
        ["3.2001", "3.1000", "-0.1001"],
        ["0.6900", "0.6900", "+0.0000"],
        ["3.1346", "3.0000", "-0.1346"],
        ["1.0000", "1.0000", "+0.0000"],
    ]
    assert by_step["200"][0] == ["2.9621", "-", "-"]  # no training loss logged on our side
    assert by_step["2900"][3] == ["0.2167", "-", "-"]  # a step this run did not reach
    assert len(lines) == 2 + 29


def test_collect_writes_table_csv_json_card_and_plot(tmp_path: Path) -> None:
    synthetic_run(tmp_path)
    done = __import__("subprocess").run(
        [PYTHON, str(ROOT / "launch" / "collect.py"), str(tmp_path), "--compare", str(REFERENCE)],
        capture_output=True,
        text=True,
        env=python_env(),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "restarts at steps: [6, 10]" in done.stdout and "val loss" in done.stdout
    table = (tmp_path / "results.md").read_text()
    assert table == (GOLDEN / "collect_4ranks_3attempts.md").read_text()
    csv_lines = (tmp_path / "results.csv").read_text().splitlines()
    assert csv_lines[0] == "Training Loss,Epoch,Step,Validation Loss,Wer" and len(csv_lines) == 6
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["final"]["wer"] == 0.2002 and result["best_step"] == 16 and result["restarts"] == [6, 10]
    card = (tmp_path / "final" / "README.md").read_text()
    for expected in (
        "- learning_rate: 0.0001",
        "- train_batch_size: 8",
        "- eval_batch_size: 1",
        "- seed: 42",
        "- optimizer: Adam with betas=(0.9,0.999) and epsilon=1e-08",  # the Trainer's words for its AdamW
        "- lr_scheduler_type: linear",
        "- lr_scheduler_warmup_steps: 2",
        "- num_epochs: 1.6",
        "- distributed_type: multi-GPU",  # the Trainer's words for any process group, on CPUs too
        "- num_devices: 4",
        "- total_train_batch_size: 32",
        "- total_eval_batch_size: 4",
        "- nodes: 2",
        "- attempts: 3",
        "- Loss: 0.802",
        "- Wer: 0.2002",
        "value: 0.2002",
        "- Pytorch 2.13.0",
        table,
    ):
        assert expected in card, expected

    def headings(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.startswith("##")]

    assert headings(card) == headings(REFERENCE.read_text())  # the reference's sections, in its order
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_root_gets_a_summary_and_a_comparison_plot(tmp_path: Path) -> None:
    for element in ("lr=1e-4", "lr=3e-4"):
        synthetic_run(tmp_path / "sweep" / element)
    queued = tmp_path / "sweep" / "lr=1e-3"  # an element whose job has not started: no logs yet
    queued.mkdir()
    (queued / "recipe.yaml").write_bytes((tmp_path / "sweep" / "lr=1e-4" / "recipe.yaml").read_bytes())
    done = __import__("subprocess").run(
        [PYTHON, str(ROOT / "launch" / "collect.py"), str(tmp_path / "sweep")],
        capture_output=True,
        text=True,
        env=python_env(),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "lr=1e-3: no logs yet" in done.stdout
    summary = (tmp_path / "sweep" / "summary.md").read_text().splitlines()
    headers = [cell.strip() for cell in summary[0].split("|")[1:-1]]
    assert headers == ["Run", "Validation Loss", "Wer", "Best Wer", "Best Step", "Restarts"]
    assert summary[2].startswith("| lr=1e-4 ") and "0.2002" in summary[2] and "| 16 " in summary[2]
    assert (tmp_path / "sweep" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "sweep" / "lr=3e-4" / "results.md").exists()


def test_card_wall_time_and_device_hours_are_the_sums_over_attempts(tmp_path: Path) -> None:
    from asrlaunch.core.logs import read_run_logs
    from asrlaunch.core.rundir import RunDir
    from asrlaunch.results.merge import run_result
    from asrlaunch.results.report import write_run_report

    synthetic_run(tmp_path)
    with pytest.warns(UserWarning):
        result = run_result(RunDir(tmp_path))
    write_run_report(result)
    wall = device = 0.0
    records = read_run_logs(tmp_path)
    for attempt in sorted({r["attempt"] for r in records}):
        times = [r["time"] for r in records if r["attempt"] == attempt]
        world = max(r.get("world_size", 1) for r in records if r["attempt"] == attempt)
        wall += max(times) - min(times)
        device += world * (max(times) - min(times))
    card = (tmp_path / "final" / "README.md").read_text()
    assert f"- wall_time_s: {wall:.0f}\n" in card and f"- device_hours: {device / 3600:.3f}\n" in card
    assert wall > 0 and "- attempts: 3\n" in card and "- restarts (resumed from step): 6, 10\n" in card
    from asrlaunch.core.goodput import goodput
    from asrlaunch.core.history import RunHistory

    allocated = goodput(RunHistory.read(RunDir(tmp_path))).allocated_s  # one figure, the card's and goodput's
    assert f"- wall_time_s: {allocated:.0f}\n" in card


def test_the_card_names_the_corpus_it_trained_on() -> None:
    from asrlaunch.results.card import DATASET, dataset_name

    assert dataset_name({"format": "timit", "dir": "/data/TIMIT", "generate": None}) == DATASET["timit"]
    assert dataset_name({"format": "timit", "dir": "x", "generate": {"train": 4}}) == DATASET["default"]
    assert dataset_name({"format": "audiofolder", "dir": "/data/my_calls/", "generate": None}) == (
        "my_calls (audiofolder)"
    )
