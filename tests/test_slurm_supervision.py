"""The supervisor and in-job restarts on the real local SLURM cluster: a silent hang (SIGSTOP) of the only
rank and of one of two ranks, a restart inside the allocation, a requeue that leaves the failing node out, a
dead rank ending the step while its peer is in a long phase, an out-of-memory split across processes. Every
run that completes is bitwise equal to an uninterrupted one."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from asrlaunch.core.history import RunHistory
from asrlaunch.core.logs import read_run_logs
from asrlaunch.core.records import is_start
from asrlaunch.core.rundir import RunDir
from asrlaunch.launcher.status import collect_status

from .conftest import PYTHON, BackgroundRun, python_env, train_to_the_end
from .slurm_cluster import (
    SLURM_MARKS,
    kill_rank,
    last_train,
    launch,
    same_weights,
    scontrol,
    wait_for_step,
    wait_until_done,
)
from .test_slurm_failures import SHAPE

pytestmark = SLURM_MARKS


def events(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in read_run_logs(run_dir) if r.get("event") == kind]


def test_the_only_rank_stopped_is_a_hang_restarted_in_the_job(tmp_path: Path, tones_corpus: Path) -> None:
    overrides = [
        "train.global_batch_size=8",
        "train.max_steps=250",
        "logging.steps=1",
        "eval.steps=1000",
        "checkpoint.save_steps=10",
    ]
    straight = BackgroundRun(tmp_path / "straight", tones_corpus, 1, "eval.at_start=false", *overrides)
    ((job_id, run_dir),) = launch(
        tmp_path, tones_corpus, "run.name=hang1", "train.hang_timeout_s=30", *overrides
    )
    wait_for_step(run_dir, 0, 20)
    kill_rank(job_id, 0, signal.SIGSTOP)
    assert wait_until_done([run_dir], timeout=400)[run_dir] == "COMPLETED"
    (hung,) = events(run_dir, "hang")
    assert hung["hung_rank"] == 0 and hung["node"] == "node1" and hung["phase"] == "step"
    assert hung["stale_s"] >= 30 and hung["budget_s"] == 30  # blamed past its budget (rounded to 0.1 s)
    stacks = Path(hung["stacks"]).read_text()
    assert "== rank 0" in stacks and "py-spy dump" in stacks and "engine/trainer.py:" in stacks, stacks[:2000]
    (failure,) = events(run_dir, "failure")
    assert (
        failure["action"] == "restart"
        and failure["first_rank"] == 0
        and failure["first_exit"].startswith("hang")
    )
    assert "Restarts=0" in scontrol("show", "job", job_id)  # the same allocation: no requeue
    (status,) = collect_status([run_dir])
    assert status.stops == ["hang"] and status.job.restarts == 0
    assert same_weights(straight.result(), run_dir)


def test_a_hung_rank_restarts_in_the_job_then_a_dead_one_requeues_without_its_node(
    tmp_path: Path, tones_corpus: Path
) -> None:
    """2 nodes of the 3-node partition: rank 1 (node2) is stopped, the supervisor ends the step, the job
    restarts in its allocation; then rank 1 dies, the restart budget is spent, and the job is requeued without
    node2, on node1 and node3, to the end."""
    shape = [*SHAPE, "train.max_steps=80"]
    straight = BackgroundRun(tmp_path / "straight", tones_corpus, 2, "eval.at_start=false", *shape)
    job = ["cluster.nodes=2", "cluster.processes_per_node=1", "cluster.max_restarts_in_job=1", *shape]
    ((job_id, run_dir),) = launch(tmp_path, tones_corpus, "run.name=hang2", *job)
    wait_for_step(run_dir, 0, 8)
    kill_rank(job_id, 1, signal.SIGSTOP)
    wait_for_step(run_dir, 1, last_train(run_dir, 0) + 3, timeout=300)  # restarted, training again
    kill_rank(job_id, 1)
    assert wait_until_done([run_dir], timeout=400)[run_dir] == "COMPLETED"
    (hang,) = events(run_dir, "hang")
    assert hang["hung_rank"] == 1 and hang["node"] == "node2" and 1 in hang["suspects"]
    restart, requeue = events(run_dir, "failure")
    assert restart["action"] == "restart" and restart["first_rank"] == 1 and restart["first_node"] == "node2"
    assert requeue["action"] == "requeue" and requeue["first_exit"] == "signal KILL"
    assert requeue["excluded_nodes"] == ["node2"] and "rank 1 failed there first" in requeue["excluded_why"]
    shown = scontrol("show", "job", job_id)
    assert "ExcNodeList=node2" in shown and "Restarts=1" in shown
    assert " NodeList=node[1,3]" in shown  # the requeued job ran on the other two nodes
    text = subprocess.run(
        [PYTHON, "-m", "asrlaunch", "status", str(run_dir)], capture_output=True, text=True, env=python_env()
    ).stdout
    assert "without node2 (rank 1 failed there first (signal KILL))" in text and "hang x1" in text
    assert "goodput: " in text
    assert same_weights(straight.result(), run_dir)


def test_a_rank_frozen_in_a_checkpoint_is_blamed_before_its_peers_barrier_times_out(
    tmp_path: Path, tones_corpus: Path
) -> None:
    """Rank 1 stops (SIGSTOP) as it starts the checkpoint of step 10; rank 0 waits for it at the checkpoint's
    barrier. Both are in a phase of 900 s, the barrier times out after 60 s: the silent rank is blamed after
    `train.hang_timeout_s` (30 s), before that timeout could fail rank 0 first."""
    job = [
        "cluster.nodes=2",
        "cluster.processes_per_node=1",
        "cluster.max_restarts_in_job=0",
        "cluster.max_failures=0",
        *SHAPE,
        "checkpoint.save_steps=10",
    ]
    fault = "freeze@step=10,rank=1,phase=checkpoint"
    ((_, run_dir),) = launch(
        tmp_path, tones_corpus, "run.name=frozen", *job, env=python_env(ASRLAUNCH_FAULT=fault)
    )
    assert wait_until_done([run_dir], timeout=300)[run_dir] == "FAILED"
    (hang,) = events(run_dir, "hang")
    assert hang["hung_rank"] == 1 and hang["phase"] == "checkpoint" and hang["budget_s"] == 30
    assert hang["suspects"] == [1] and "== rank 1" in Path(hang["stacks"]).read_text()
    (failure,) = events(run_dir, "failure")
    assert failure["first_rank"] == 1 and failure["first_exit"].startswith("hang")


def test_a_dead_rank_ends_the_step_at_once_while_its_peer_is_in_a_long_phase(
    tmp_path: Path, tones_corpus: Path
) -> None:
    """Rank 0 sleeps 120 s at the start of an evaluation (no collective there); rank 1 dies as it starts the
    same evaluation: srun ends the step within seconds, not after the sleep or the collective timeout."""
    faults = "stall@step=6,rank=0,phase=eval,seconds=120;crash@step=6,rank=1,phase=eval"
    job = [
        "cluster.nodes=2",
        "cluster.processes_per_node=1",
        "cluster.max_restarts_in_job=0",
        "cluster.max_failures=0",
        *SHAPE,
        "train.collective_timeout_s=300",  # the peer's collectives do not end it either
        "eval.steps=6",
    ]
    ((_, run_dir),) = launch(
        tmp_path, tones_corpus, "run.name=dead", *job, env=python_env(ASRLAUNCH_FAULT=faults)
    )
    assert wait_until_done([run_dir], timeout=300)[run_dir] == "FAILED"
    stall = next(r for r in events(run_dir, "fault") if r["rank"] == 0)
    (failure,) = events(run_dir, "failure")
    assert failure["first_rank"] == 1 and failure["first_exit"] == "signal KILL"
    # rank 0 never woke from its sleep (no evaluation, no collective's error): srun ended it inside it
    after = [r for r in read_run_logs(run_dir) if r["rank"] == 0 and r["time"] > stall["time"]]
    assert [r.get("event") for r in after] == ["failure"], after
    crash = next(r for r in events(run_dir, "fault") if r["rank"] == 1)
    assert failure["time"] - crash["time"] < 30  # within seconds: neither the sleep's 120 s nor a timeout


@pytest.mark.parametrize("backend", ["ddp", "deepspeed"])
def test_out_of_memory_on_one_of_two_ranks_continues_at_half_the_micro_batch(
    tmp_path: Path, tones_corpus: Path, backend: str
) -> None:
    shape = [
        "train.global_batch_size=8",
        "train.max_micro_batch_size=4",
        "train.max_steps=10",
        "logging.steps=1",
        "logging.sample_ids=true",
        "eval.steps=1000",
        "checkpoint.save_steps=3",
    ]
    reference = train_to_the_end(tmp_path / "one", tones_corpus, 1, "eval.at_start=false", *shape)
    job = ["cluster.nodes=2", "cluster.processes_per_node=1", f"train.backend={backend}", *shape]
    env = python_env(ASRLAUNCH_FAULT="oom@step=5,micro=4,rank=1")
    ((_, run_dir),) = launch(tmp_path, tones_corpus, "run.name=oom", *job, env=env)
    assert wait_until_done([run_dir], timeout=400)[run_dir] == "COMPLETED"
    (split,) = [r for r in events(run_dir, "oom_split") if r["rank"] == 1]
    assert (split["step"], split["plan"]["micro_batch"], split["plan"]["grad_accum"]) == (5, 2, 2)
    (failure,) = events(run_dir, "failure")
    assert failure["action"] == "restart" and failure["first_rank"] == 1
    starts = [r for r in read_run_logs(run_dir) if is_start(r) and r["rank"] == 0]
    assert [s["plan"]["micro_batch"] for s in starts] == [4, 2] and starts[1]["resumed_from"] == 3
    ids = {
        r["step"]: r["sample_ids"] for r in read_run_logs(run_dir) if r["kind"] == "train" and r["rank"] == 0
    }
    expected = {r["step"]: r["sample_ids"] for r in read_run_logs(reference) if r["kind"] == "train"}
    assert ids == expected  # the same samples at every step, before and after the split
    # ... and the same training: each step's loss (the mean of the ranks' equal halves) and gradient norm as
    # one process's at micro 4 x accumulation 2, the attempt at micro 2 x 2 included (its records come last).
    trained: dict[int, dict[int, dict]] = {}
    for record in read_run_logs(run_dir):
        if record["kind"] == "train":
            trained.setdefault(record["step"], {})[record["rank"]] = record
    single = {r["step"]: r for r in read_run_logs(reference) if r["kind"] == "train"}
    assert sorted(trained) == sorted(single) == list(range(1, 11))
    for step, ranks in trained.items():
        assert (ranks[0]["loss"] + ranks[1]["loss"]) / 2 == pytest.approx(single[step]["loss"], rel=1e-4), (
            step
        )
        assert ranks[0]["grad_norm"] == pytest.approx(single[step]["grad_norm"], rel=1e-3), step
    history = RunHistory.read(RunDir(run_dir))
    assert history.oom_micro_cap() == 2 and json.dumps(history.restarts) == "[3]"
