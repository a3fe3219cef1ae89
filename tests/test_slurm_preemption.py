"""Preemption on the real local SLURM cluster: stops that end in a checkpoint and an exact requeue."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from asrlaunch.core.logs import read_run_logs
from asrlaunch.core.records import is_start
from asrlaunch.launcher.status import collect_status

from .conftest import PYTHON, ROOT, BackgroundRun, notable, python_env
from .slurm_cluster import (
    SLURM_MARKS,
    STATUS,
    SUBMIT,
    last_train,
    launch,
    preempt_with_a_high_priority_job,
    same_weights,
    scontrol,
    wait_for_step,
    wait_until_done,
)

pytestmark = SLURM_MARKS


def test_preempted_three_times_ends_like_an_uninterrupted_run(tmp_path: Path, tones_corpus: Path) -> None:
    """A high-priority job, `scancel --signal=USR2` and a time limit each stop it; it resumes every time."""
    overrides = [
        "train.global_batch_size=8",
        "train.max_micro_batch_size=8",
        "train.max_steps=250",
        "logging.steps=1",
        "eval.steps=1000",
        "checkpoint.save_steps=1000",
    ]
    straight = BackgroundRun(tmp_path / "straight", tones_corpus, 1, "eval.at_start=false", *overrides)
    ((job_id, run_dir),) = launch(
        tmp_path,
        tones_corpus,
        "run.name=preempted",
        "cluster.partition=low",
        "cluster.time_min=10",
        "cluster.signal_delay_s=90",
        *overrides,
        # Slow steps (sleeps: the same numbers), so the third stop, a time limit seconds away, finds the job
        # still training rather than done.
        env=python_env(ASRLAUNCH_FAULT="slow@rank=0,factor=8"),
    )
    # 1. preemption by a high-priority job that needs every node
    wait_for_step(run_dir, 0, 3)
    preempt_with_a_high_priority_job()
    # 2. a user signal, as `scancel --signal` delivers it
    wait_for_step(run_dir, 1, last_train(run_dir, 0) + 3)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    # 3. a time limit 100 s away, so that the USR2@90 signal is due within seconds
    wait_for_step(run_dir, 2, last_train(run_dir, 1) + 3)
    (running,) = collect_status([run_dir])  # two restarts so far: status counts them and still has an ETA
    assert running.job.restarts == 2 and running.stops == ["preemption", "preemption"]
    assert running.eta_s is not None and running.eta_s > 0
    table = subprocess.run([PYTHON, STATUS, str(run_dir)], capture_output=True, text=True, env=python_env())
    row = table.stdout.splitlines()[1]
    assert "RUNNING" in row and " 2 " in row and "preemption x2" in row and row.rstrip()[-1].isdigit(), row
    elapsed = running.job.elapsed
    minutes, seconds = (int(x) for x in elapsed.split(":")[-2:])
    limit = minutes * 60 + seconds + 100
    scontrol("update", f"JobId={job_id}", f"TimeLimit=0:{limit // 60:02d}:{limit % 60:02d}")
    deadline = time.monotonic() + 120
    while "JobState=RUNNING" in scontrol("show", "job", job_id) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "JobState=RUNNING" not in scontrol("show", "job", job_id), "no time-limit signal came"
    scontrol("update", f"JobId={job_id}", "TimeLimit=10")  # the requeued job gets its full limit back
    states = wait_until_done([run_dir], timeout=400)
    assert states[run_dir] == "COMPLETED"
    assert "Restarts=3" in scontrol("show", "job", job_id)
    events = notable(read_run_logs(run_dir))
    assert [e["event"] for e in events] == ["preemption", "preemption", "timeout"]
    assert all(e["requeued"] for e in events[1:])
    assert same_weights(straight.result(), run_dir)
    metas = [r for r in read_run_logs(run_dir) if is_start(r)]
    assert [m["attempt"] for m in metas] == [0, 1, 2, 3]
    assert [m["slurm_restart_count"] for m in metas] == [0, 1, 2, 3]


def test_preempted_then_cancelled_run_resumes_and_collects(tmp_path: Path, tones_corpus: Path) -> None:
    """A 2-task run is preempted (requeued by itself), then cancelled by scancel and
    re-submitted with `submit.py --resume`; the collector's table has one row per evaluation, replayed steps
    counted once, and the table, CSV, JSON, model card and plot agree."""
    ((job_id, run_dir),) = launch(
        tmp_path,
        tones_corpus,
        "run.name=resumed",
        "cluster.nodes=2",
        "cluster.partition=low",
        "train.global_batch_size=8",
        "train.max_micro_batch_size=4",
        "train.max_steps=200",
        "logging.steps=1",
        "eval.steps=50",
        "checkpoint.save_steps=10",
    )
    wait_for_step(run_dir, 0, 14)
    preempt_with_a_high_priority_job()
    wait_for_step(run_dir, 1, last_train(run_dir, 0) + 14)
    subprocess.run(["scancel", job_id], check=True)
    wait_until_done([run_dir])
    killed_at = last_train(run_dir, 1)
    done = subprocess.run(
        [PYTHON, SUBMIT, "--resume", str(run_dir), "--executor", "slurm", "--wait"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=python_env(),
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "COMPLETED" in done.stdout
    (status,) = collect_status([run_dir])
    assert status.job_id != job_id and status.step == 200
    assert [a for a, _ in status.starts] == [0, 1, 2]
    preempted_at, resumed_at = (step for _, step in status.starts[1:])
    events = [r for r in notable(read_run_logs(run_dir)) if r["rank"] == 0]
    stops = [(e["event"], e["step"]) for e in events]
    assert stops[0] == ("preemption", preempted_at)
    # scancel's SIGTERM checkpoints the step reached when SLURM's KillWait leaves the time to; else the
    # resume starts from the last periodic checkpoint
    assert stops[1:] == [("terminated", resumed_at)] or (stops[1:] == [] and resumed_at % 10 == 0), stops
    assert preempted_at < resumed_at <= killed_at < 200
    shown = subprocess.run([PYTHON, STATUS, str(run_dir)], capture_output=True, text=True, env=python_env())
    assert "COMPLETED" in shown.stdout and f" {preempted_at},{resumed_at} " in shown.stdout

    collected = subprocess.run(
        [PYTHON, str(ROOT / "launch" / "collect.py"), str(run_dir)],
        capture_output=True,
        text=True,
        env=python_env(),
        timeout=120,
    )
    assert collected.returncode == 0, collected.stderr
    check_results_agree(run_dir, steps=[50, 100, 150, 200], restarts=[preempted_at, resumed_at])
    card = (run_dir / "final" / "README.md").read_text()
    assert "- num_devices: 2" in card and "- attempts: 3" in card and "- nodes: 2" in card


def check_results_agree(run_dir: Path, steps: list[int], restarts: list[int]) -> None:
    """results.md, .csv, .json and the model card hold the same rows; the plot is a real picture."""
    import csv

    from matplotlib.image import imread

    from asrlaunch.results.table import HEADERS, NO_LOG, parse_table

    headers, table = parse_table((run_dir / "results.md").read_text())
    with (run_dir / "results.csv").open() as file:
        csv_rows = list(csv.reader(file))
    result = json.loads((run_dir / "results.json").read_text())
    assert headers == list(HEADERS) == csv_rows[0]
    assert [int(row[2]) for row in table] == steps == [row["Step"] for row in result["rows"]]
    assert result["restarts"] == restarts
    for md_row, csv_row, json_row in zip(table, csv_rows[1:], result["rows"], strict=True):
        for header, md_value, csv_value in zip(HEADERS, md_row, csv_row, strict=True):
            if md_value == NO_LOG:
                assert csv_value == json_row[header] == NO_LOG
                continue
            assert float(md_value) == pytest.approx(float(csv_value), abs=5e-5), header
            assert float(md_value) == pytest.approx(float(json_row[header]), abs=5e-5), header
    card = (run_dir / "final" / "README.md").read_text()
    assert (run_dir / "results.md").read_text() in card
    assert f"value: {result['final']['wer']}" in card and f"- Wer: {table[-1][4]}" in card
    picture = imread(run_dir / "curves.png")
    height, width = picture.shape[:2]
    assert height >= 300 and width >= 800
    ink = (picture[..., :3] < 0.9).any(axis=-1).mean()  # share of pixels that are not (near) white
    assert 0.01 < ink < 0.5
