"""Against the real local SLURM cluster (`bash slurm/cluster.sh start`): submit, arrays, status."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from asrlaunch.core.logs import read_run_logs
from asrlaunch.core.records import is_start
from asrlaunch.launcher.status import TERMINAL, collect_status

from .conftest import PYTHON, RECIPES, ROOT, BackgroundRun, notable, python_env

SUBMIT, STATUS = str(ROOT / "launch" / "submit.py"), str(ROOT / "launch" / "status.py")
CLUSTER = ROOT / "slurm" / "cluster.sh"


def _cluster_up() -> bool:
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.skipif(not _cluster_up() and not os.environ.get("CI"), reason="no local SLURM cluster"),
]


def launch(
    tmp_path: Path, corpus: Path, *args: str, env: dict[str, str] | None = None
) -> list[tuple[str, Path]]:
    done = subprocess.run(
        [
            PYTHON,
            SUBMIT,
            str(RECIPES / "smoke.yaml"),
            f"data.dir={corpus}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "train.max_steps=4",
            "eval.steps=4",
            "eval.at_start=false",
            "logging.steps=2",
            "cluster.cpus_per_task=1",
            "--executor",
            "slurm",
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env or python_env(),
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    jobs = []
    for line in done.stdout.splitlines():
        if line.startswith("submitted slurm job"):
            job_id, run_dir = line.removeprefix("submitted slurm job ").split(": ")
            jobs.append((job_id, tmp_path / run_dir))
    assert jobs, done.stdout
    return jobs


def squeue_ids() -> set[str]:
    out = subprocess.run(
        ["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True, check=True
    ).stdout
    return set(out.split())


def wait_until_done(run_dirs: list[Path], timeout: float = 400) -> dict[Path, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = {s.run_dir.path: s.job.state for s in collect_status(run_dirs)}
        if all(state in TERMINAL for state in states.values()):
            return states
        time.sleep(2)
    raise AssertionError(f"jobs still running after {timeout} s: {states}")


def test_two_node_job_runs_and_completes(tmp_path: Path, tones_corpus: Path) -> None:
    ((job_id, run_dir),) = launch(tmp_path, tones_corpus, "cluster.nodes=2", "cluster.processes_per_node=1")
    seen_running = False
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        (status,) = collect_status([run_dir])
        # squeue, our library and our CLI agree while it runs (a job ending between two looks is no finding)
        if status.job.state == "RUNNING" and status.job.source == "squeue" and job_id in squeue_ids():
            shown = subprocess.run(
                [PYTHON, STATUS, str(run_dir)], capture_output=True, text=True, env=python_env()
            )
            seen_running = seen_running or ("RUNNING" in shown.stdout and job_id in shown.stdout)
        if status.job.state in TERMINAL:
            break
        time.sleep(1)
    assert seen_running
    assert status.job.state == "COMPLETED", (run_dir / "submitit").glob("*.err")
    assert status.job.nodes == "node[1-2]" and status.step == 4 and status.total_steps == 4
    metas = [
        json.loads(line)
        for rank in (0, 1)
        for line in (run_dir / "logs" / f"rank{rank}.jsonl").read_text().splitlines()
        if is_start(json.loads(line))
    ]
    assert [m["world_size"] for m in metas] == [2, 2]
    assert metas[0]["plan"] == metas[1]["plan"]
    assert metas[0]["job_id"] == metas[1]["job_id"] == job_id
    assert (run_dir / "final" / "model.safetensors").exists()
    shown = subprocess.run(
        [PYTHON, STATUS, str(run_dir), "--json"], capture_output=True, text=True, env=python_env()
    )
    record = json.loads(shown.stdout)
    assert record["job"]["state"] == "COMPLETED" and record["job"]["source"] == "sacct"
    assert record["step"] == 4 and record["wer"] is not None


def test_sweep_is_one_job_array_and_both_complete(tmp_path: Path, tones_corpus: Path) -> None:
    jobs = launch(tmp_path, tones_corpus, "run.name=sweep", "--sweep", "train.seed=1,2")
    assert len(jobs) == 2
    array_ids = {job_id.split("_")[0] for job_id, _ in jobs}
    assert len(array_ids) == 1 and [j.split("_")[1] for j, _ in jobs] == ["0", "1"]
    states = wait_until_done([run_dir for _, run_dir in jobs])
    assert set(states.values()) == {"COMPLETED"}
    for _, run_dir in jobs:
        assert (run_dir / "recipe.yaml").exists() and (run_dir / "final" / "config.json").exists()
    seeds = {
        json.loads((d / "logs" / "rank0.jsonl").read_text().splitlines()[0])["recipe"]["train"]["seed"]
        for _, d in jobs
    }
    assert seeds == {1, 2}
    # the sweep's root stands for all its elements
    shown = subprocess.run(
        [PYTHON, STATUS, str(tmp_path / "runs" / "sweep")], capture_output=True, text=True, env=python_env()
    )
    assert shown.stdout.count("COMPLETED") == 2


def test_status_without_accounting_falls_back_to_squeue(tmp_path: Path, tones_corpus: Path) -> None:
    ((job_id, run_dir),) = launch(
        tmp_path, tones_corpus, "run.name=noacct", "train.max_steps=25", "eval.steps=1000"
    )
    subprocess.run(["bash", str(CLUSTER), "dbd-stop"], check=True, capture_output=True)
    try:
        assert subprocess.run(["sacct", "-j", job_id], capture_output=True).returncode != 0
        wait_for_step(run_dir, 0, 2)  # running, and logging: state from squeue, progress from the logs
        (running,) = collect_status([run_dir])
        assert running.job.state == "RUNNING" and running.job.source == "squeue", running
        assert running.job.nodes.startswith("node") and running.step is not None and running.step >= 2
        states = wait_until_done([run_dir])
        (status,) = collect_status([run_dir])
        assert states[run_dir] == "COMPLETED"
        assert status.job.source == "squeue -t all"
        assert status.job.restarts == 0
    finally:
        subprocess.run(["bash", str(CLUSTER), "dbd-start"], check=True, capture_output=True)


def last_train(run_dir: Path, attempt: int) -> int:
    """The last step trained by `attempt`, from rank 0's log (0 if none yet)."""
    from asrlaunch.core.logs import read_records

    path = run_dir / "logs" / "rank0.jsonl"
    if not path.exists():
        return 0
    steps = [r["step"] for r in read_records(path) if r["kind"] == "train" and r["attempt"] == attempt]
    return max(steps, default=0)


def wait_for_step(run_dir: Path, attempt: int, at_least: int, timeout: float = 240) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        step = last_train(run_dir, attempt)
        if step >= at_least:
            return step
        time.sleep(0.5)
    raise AssertionError(f"attempt {attempt} did not reach step {at_least}: {collect_status([run_dir])}")


def preempt_with_a_high_priority_job() -> None:
    """A short job on the `high` partition that needs every node: SLURM preempts (requeues) `low` jobs."""
    subprocess.run(
        ["sbatch", "-p", "high", "--nodes=3", "--exclusive", "-o", "/dev/null", "--wrap", "sleep 3"],
        check=True,
        capture_output=True,
    )


def scontrol(*args: str) -> str:
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, check=True).stdout


def test_preempted_three_times_ends_like_an_uninterrupted_run(tmp_path: Path, tones_corpus: Path) -> None:
    """A high-priority job, `scancel --signal=USR2` and a time limit each stop it; it resumes every time."""
    import torch
    from safetensors.torch import load_file

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
    a, b = (
        load_file(str(straight.result() / "final" / "model.safetensors")),
        load_file(str(run_dir / "final" / "model.safetensors")),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
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


def test_a_shape_no_node_has_waits_with_its_reason_in_status(tmp_path: Path, tones_corpus: Path) -> None:
    """Refused by preflight; with --no-preflight it is queued, and status says why it waits."""
    refused = subprocess.run(
        [PYTHON, SUBMIT, str(RECIPES / "smoke.yaml"), f"data.dir={tones_corpus}", "cluster.cpus_per_task=8"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=python_env(),
    )
    assert refused.returncode == 2 and "cluster.cpus_per_task=8" in refused.stderr
    ((job_id, run_dir),) = launch(tmp_path, tones_corpus, "cluster.cpus_per_task=8", "--no-preflight")
    try:
        deadline = time.monotonic() + 60
        while (status := collect_status([run_dir])[0]).job.reason != "PartitionConfig":
            assert time.monotonic() < deadline, status
            time.sleep(1)
        assert status.job.state == "PENDING"
        shown = subprocess.run(
            [PYTHON, STATUS, str(run_dir)], capture_output=True, text=True, env=python_env()
        )
        assert "PENDING (PartitionConfig)" in shown.stdout
        as_json = subprocess.run(
            [PYTHON, STATUS, str(run_dir), "--json"], capture_output=True, text=True, env=python_env()
        )
        assert json.loads(as_json.stdout)["job"]["reason"] == "PartitionConfig"
    finally:
        subprocess.run(["scancel", job_id], check=False)


def test_the_requeue_budget_stops_requeues_and_resume_continues(tmp_path: Path, tones_corpus: Path) -> None:
    """cluster.max_requeues=1 and two stops: the second is not requeued, status and the log say why, its
    checkpoint stays; --resume is refused while a job may still run, then continues the run to its end."""
    overrides = ["train.global_batch_size=8", "train.max_steps=60", "logging.steps=1", "eval.steps=1000"]
    ((job_id, run_dir),) = launch(
        tmp_path, tones_corpus, "run.name=budget", "cluster.max_requeues=1", *overrides
    )
    wait_for_step(run_dir, 0, 3)
    resume = [PYTHON, SUBMIT, "--resume", str(run_dir)]
    refused = subprocess.run(resume, capture_output=True, text=True, env=python_env(), cwd=tmp_path)
    assert refused.returncode == 2 and f"its job {job_id} is RUNNING" in refused.stderr
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    wait_for_step(run_dir, 1, last_train(run_dir, 0) + 3)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    assert wait_until_done([run_dir])[run_dir] == "FAILED"
    events = [r for r in notable(read_run_logs(run_dir)) if r["rank"] == 0]
    assert [e["requeued"] for e in events] == [True, False]
    assert "requeue limit reached (cluster.max_requeues=1)" in events[-1]["error"]
    from asrlaunch.engine import checkpoint

    assert checkpoint.list_checkpoints(run_dir / "checkpoints")[0][0] == events[-1]["step"]
    shown = subprocess.run([PYTHON, STATUS, str(run_dir)], capture_output=True, text=True, env=python_env())
    assert "requeue limit reached" in shown.stdout
    assert (
        subprocess.run(resume, capture_output=True, text=True, env=python_env(), cwd=tmp_path).returncode == 0
    )
    assert wait_until_done([run_dir])[run_dir] == "COMPLETED"
    # A job whose state cannot be read (UNKNOWN) may be running: refused, unless forced after checking squeue.
    jobs = json.loads((run_dir / "job.json").read_text())
    jobs["jobs"].append({**jobs["jobs"][-1], "job_id": "987654321"})
    (run_dir / "job.json").write_text(json.dumps(jobs))
    unknown = subprocess.run(resume, capture_output=True, text=True, env=python_env(), cwd=tmp_path)
    assert unknown.returncode == 2 and "cannot be read" in unknown.stderr and "--force" in unknown.stderr
    forced = subprocess.run(
        [*resume, "--force"], capture_output=True, text=True, env=python_env(), cwd=tmp_path
    )
    assert forced.returncode == 0, forced.stderr


def test_a_gpu_shaped_job_runs_one_task_per_gpu(tmp_path: Path, tones_corpus: Path) -> None:
    """2 nodes x 2 (fake) GPUs: four tasks, each with its own GPU; on CPUs the engine trains without them."""
    ((_, run_dir),) = launch(tmp_path, tones_corpus, "cluster.nodes=2", "cluster.gpus_per_node=2")
    assert wait_until_done([run_dir])[run_dir] == "COMPLETED"
    metas = [r for r in read_run_logs(run_dir) if is_start(r)]
    assert sorted(m["rank"] for m in metas) == [0, 1, 2, 3] and {m["world_size"] for m in metas} == {4}
    assert {json.dumps(m["plan"]) for m in metas} == {json.dumps(metas[0]["plan"])}
    assert (metas[0]["plan"]["micro_batch"], metas[0]["plan"]["grad_accum"]) == (8, 1)
    gpus = {(m["node"], m["cuda_visible_devices"].split(",")[m["local_rank"]]) for m in metas}
    assert len(gpus) == 4 and len({node for node, _ in gpus}) == 2, gpus
    assert {m["device"].split(":")[0] for m in metas} == {"cpu"}


def test_a_corpus_prepared_off_the_gpus_first_then_only_when_needed(
    tmp_path: Path, tones_corpus: Path
) -> None:
    """`cluster.prepare_partition`: a CPU job prepares the corpus, the training job waits for it (afterok) and
    finds it in the cache; a second run of the same corpus needs no preparation job; a preparation that fails
    leaves the training job pending on its dependency, and status says why."""
    import shutil

    corpus = tmp_path / "fresh"
    shutil.copytree(tones_corpus, corpus)
    prepare = ["cluster.prepare_partition=debug", "cluster.prepare_cpus=1", f"data.dir={corpus}"]
    ((job_id, run_dir),) = launch(tmp_path, tones_corpus, "run.name=prepared", *prepare)
    jobs = json.loads((run_dir / "job.json").read_text())["jobs"]
    (preparation,) = [j["job_id"] for j in jobs if j.get("role") == "prepare"]
    script = (run_dir / "submitit" / f"{job_id}_submission.sh").read_text()
    assert f"#SBATCH --dependency=afterok:{preparation}" in script
    assert wait_until_done([run_dir])[run_dir] == "COMPLETED"
    assert json.loads((run_dir / "prepare.json").read_text())["cache"] == "built"
    (start,) = [r for r in read_run_logs(run_dir) if is_start(r)]
    assert start["cache"] == "hit"
    assert "corpus: cache hit" in (run_dir / "submitit" / f"{job_id}_0_log.out").read_text()

    ((_, again),) = launch(tmp_path, tones_corpus, "run.name=again", *prepare)
    assert [j.get("role") for j in json.loads((again / "job.json").read_text())["jobs"]] == [None]

    broken = tmp_path / "broken"
    shutil.copytree(tones_corpus, broken)
    next(broken.rglob("*.WAV")).write_bytes(b"not audio")
    bad = [
        "cluster.prepare_partition=debug",
        "cluster.prepare_cpus=1",
        f"data.dir={broken}",
        "--no-preflight",
    ]
    ((blocked_id, blocked),) = launch(tmp_path, tones_corpus, "run.name=blocked", *bad)
    try:
        deadline = time.monotonic() + 120
        while (status := collect_status([blocked])[0]).job.reason != "DependencyNeverSatisfied":
            assert time.monotonic() < deadline, status
            time.sleep(1)
        shown = subprocess.run(
            [PYTHON, STATUS, str(blocked)], capture_output=True, text=True, env=python_env()
        )
        assert "PENDING (DependencyNeverSatisfied)" in shown.stdout
        assert "preparation failed" in shown.stdout and "unreadable audio" in shown.stdout
    finally:
        subprocess.run(["scancel", blocked_id], check=False)
