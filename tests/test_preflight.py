"""Preflight: what is refused before anything is queued, one line naming the key; `--no-preflight` submits
anyway and status then shows why the job waits."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from asrlaunch.core.recipe import load_recipe
from asrlaunch.launcher.preflight import check_shape, check_stop_signal, limit_minutes, parse_sinfo_nodes

from .conftest import PYTHON, RECIPES, ROOT, python_env
from .slurm_cluster import cluster_up

SINFO = """\
node1|debug*|2|8000|gpu:2|infinite
node1|low|2|8000|gpu:2|infinite
node2|debug*|2|8000|gpu:2|infinite
node3|debug*|4|16000|gpu:4(S:0-1)|1-00:00:00
gpu7|gpu|64|512000|gpu:h100:8,shard:8|4:00:00
"""
SUBMIT = str(ROOT / "launch" / "submit.py")


def test_sinfo_nodes_and_time_limits_parse() -> None:
    nodes = {n.name: n for n in parse_sinfo_nodes(SINFO)}
    assert nodes["node1"].partitions == {"debug", "low"} and nodes["node1"].default_partition == "debug"
    assert (nodes["node3"].cpus, nodes["node3"].memory_mb, nodes["node3"].gpus) == (4, 16000, 4)
    assert nodes["gpu7"].gpus == 8 and nodes["gpu7"].max_time == "4:00:00"
    assert limit_minutes("infinite") is None and limit_minutes("1-00:00:00") == 1440
    assert limit_minutes("4:00:00") == 240 and limit_minutes("30:00") == 30


@pytest.mark.parametrize(
    ("overrides", "ok", "names"),
    [
        (["cluster.cpus_per_task=2"], True, ""),
        (["cluster.cpus_per_task=4", "cluster.nodes=2"], False, "cluster.cpus_per_task=4"),
        (["cluster.cpus_per_task=8"], False, "node3) has 4 CPUs"),
        (["cluster.mem_gb=64"], False, "cluster.mem_gb"),
        (["cluster.gpus_per_node=8"], False, "cluster.gpus_per_node"),
        (
            ["cluster.partition=gpu", "cluster.gpus_per_node=8", "cluster.time_min=300"],
            False,
            "cluster.time_min=300",
        ),
        (["cluster.partition=nope"], False, "no partition 'nope' (there are: debug, gpu, low)"),
    ],
)
def test_the_job_shape_must_fit_a_node_of_its_partition(overrides: list[str], ok: bool, names: str) -> None:
    recipe = load_recipe(RECIPES / "smoke.yaml", overrides)
    check = check_shape(recipe, parse_sinfo_nodes(SINFO))
    assert check.ok is ok, check.message
    assert names in check.message


@pytest.mark.parametrize(
    ("executor", "time_min", "delay_s", "ok"),
    [("slurm", 3, 60, True), ("slurm", 2, 60, False), ("slurm", 1, 30, False), ("local", 1, 35, True)],
)
def test_the_stop_signal_must_not_come_as_the_job_starts(
    executor: str, time_min: int, delay_s: int, ok: bool
) -> None:
    """SLURM may send USR2 up to a minute before cluster.signal_delay_s; the local executor, on time."""
    overrides = [f"cluster.time_min={time_min}", f"cluster.signal_delay_s={delay_s}"]
    check = check_stop_signal(load_recipe(RECIPES / "smoke.yaml", overrides), executor)
    assert check.ok is ok, check.message
    if not ok:
        assert (
            f"cluster.time_min={time_min} is too short for cluster.signal_delay_s={delay_s}" in check.message
        )
        assert f"set cluster.time_min above {(delay_s + 60) // 60}" in check.message


@pytest.mark.skipif(not cluster_up(), reason="no local SLURM cluster")
def test_a_new_users_timit32_submission_is_refused_with_what_to_fix(tmp_path: Path) -> None:
    done = subprocess.run(
        [PYTHON, SUBMIT, str(RECIPES / "timit32.yaml")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=python_env(HF_HOME=str(tmp_path / "hf")),
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr and "Warning:" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 3, done.stderr
    assert errors[0].startswith("error: data.dir: /datasets/timit/TIMIT: the TIMIT folder does not exist")
    assert "model.name_or_path: facebook/wav2vec2-base is not in the Hugging Face cache" in errors[1]
    assert "cluster.cpus_per_task=8" in errors[2] and "cluster.mem_gb" in errors[2]
    assert "the largest node of debug (node1) has 2 CPUs" in errors[2]
    assert not (tmp_path / "runs").exists()  # nothing written, nothing queued
    dry = subprocess.run(
        [PYTHON, SUBMIT, str(RECIPES / "timit32.yaml"), "--dry-run"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=python_env(HF_HOME=str(tmp_path / "hf")),
    )
    # The whole plan, then the same refusal, so that a script or CI checking recipes stops there.
    assert dry.returncode == 2 and "# preflight FAIL  data: data.dir:" in dry.stdout
    assert "# preflight   ok  trackers: tensorboard" in dry.stdout and "# sbatch script" in dry.stdout
    assert [line for line in dry.stderr.splitlines() if line.startswith("error: ")] == errors
    assert "(a submission would be refused; --no-preflight skips these checks)" in dry.stderr


def test_a_corpus_of_an_unexpected_size_is_named_beside_the_expected_one(tones_corpus: Path) -> None:
    from asrlaunch.launcher.preflight import check_data

    recipe = load_recipe(RECIPES / "smoke.yaml", [f"data.dir={tones_corpus}"])
    check = check_data(recipe)
    assert check.ok and "64 train / 16 test; data.expected_train_size says 400" in check.message
