"""Against the real local SLURM cluster (`bash slurm/cluster.sh start`): submit, arrays, status."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from asrlaunch.core.logs import read_run_logs
from asrlaunch.core.records import is_start
from asrlaunch.core.rundir import RunDir
from asrlaunch.launcher.status import TERMINAL, collect_status, wait_for

from .conftest import PYTHON, RECIPES, notable, python_env
from .slurm_cluster import (
    CLUSTER,
    SLURM_MARKS,
    STATUS,
    SUBMIT,
    last_train,
    launch,
    squeue_ids,
    wait_for_step,
    wait_until_done,
)

pytestmark = SLURM_MARKS


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
    # A job whose state cannot be read (UNKNOWN) may be running: refused, unless forced after checking squeue.
    forgotten = {**RunDir(run_dir).jobs()[-1], "job_id": "987654321"}
    RunDir(run_dir).record_job(forgotten)
    unknown = subprocess.run(resume, capture_output=True, text=True, env=python_env(), cwd=tmp_path)
    assert unknown.returncode == 2 and "cannot be read" in unknown.stderr and "--force" in unknown.stderr
    forced = subprocess.run(
        [*resume, "--force"], capture_output=True, text=True, env=python_env(), cwd=tmp_path
    )
    assert forced.returncode == 0, forced.stderr
    assert wait_until_done([run_dir])[run_dir] == "COMPLETED"
    # Once the run has finished, a job the scheduler forgot completed all the same.
    RunDir(run_dir).record_job(forgotten)
    shown = subprocess.run([PYTHON, STATUS, str(run_dir)], capture_output=True, text=True, env=python_env())
    assert "COMPLETED" in shown.stdout and "UNKNOWN" not in shown.stdout


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


def test_nodes_that_do_not_share_the_corpus_cache_prepare_it_once_each(
    tmp_path: Path, tones_corpus: Path
) -> None:
    """A node-local `data.cache_dir` (`$SLURM_TMPDIR/asr` on a real cluster; here, where the nodes share one
    disk, a folder per node): rank 0 prepares the corpus in node1's cache; node2's first rank prepares it once
    more in node2's (45 s longer here: a big corpus) while node2's other rank waits for it; and every rank
    waits for node2 in files, not in its first collective, which would time out after 30 s."""
    env = python_env(ASRLAUNCH_FAULT="stall@step=0,rank=2,phase=prepare,seconds=45")
    node_local = f"data.cache_dir={tmp_path / 'cache'}-$SLURMD_NODENAME"
    job = ["cluster.nodes=2", "cluster.processes_per_node=2", "cluster.max_restarts_in_job=0"]
    ((_, run_dir),) = launch(
        tmp_path, tones_corpus, node_local, *job, "train.collective_timeout_s=30", env=env
    )
    assert wait_until_done([run_dir])[run_dir] == "COMPLETED"
    starts = {r["rank"]: r for r in read_run_logs(run_dir) if is_start(r)}
    assert {rank: (r["node"], r["cache"]) for rank, r in starts.items()} == {
        0: ("node1", "built"),
        1: ("node1", "hit"),
        2: ("node2", "built"),
        3: ("node2", "hit"),
    }
    assert {r["attempt"] for r in starts.values()} == {0}
    for node in ("node1", "node2"):
        assert len(list((tmp_path / f"cache-{node}").glob("*/table.arrow"))) == 2
    told = "".join(path.read_text() for path in (run_dir / "submitit").glob("*.out"))
    assert "corpus: node node2 does not see the cache rank 0 prepared" in told


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
        (waited,) = wait_for([RunDir(blocked)], poll_s=0.5)  # `submit --wait` ends: the job never starts
        assert waited.never_starts and "unreadable audio" in waited.preparation
        assert f"its job never starts (a job it depends on failed): scancel {blocked_id}" in waited.notes[-1]
    finally:
        subprocess.run(["scancel", blocked_id], check=False)
