"""Experiment trackers through accelerate: TensorBoard (the default), MLflow (a file store in the run
directory) and W&B (offline), through a kill -9 and a resume that replays steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from asrlaunch.core.recipe import load_recipe
from asrlaunch.core.rundir import RunDir
from asrlaunch.engine.tracking import hyperparameters
from asrlaunch.launcher.preflight import missing_packages

from .conftest import RECIPES, engine_command
from .test_resume import kill_when, run

pytestmark = pytest.mark.slow


def test_a_missing_tracker_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "mlflow" else real(name))
    recipe = load_recipe(RECIPES / "smoke.yaml", ["logging.report_to=[tensorboard, mlflow]"])
    assert missing_packages(recipe) == [
        "logging.report_to: mlflow needs the mlflow package: pip install 'asrlaunch[mlflow]' "
        "(or drop it from logging.report_to)"
    ]
    assert hyperparameters({"train": {"lr": 0.1, "adam_betas": [0.9, 0.99]}, "run": {"name": "x"}}) == {
        "train.lr": 0.1,
        "train.adam_betas": "[0.9, 0.99]",
        "run.name": "x",
    }


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (folder,) = [
        p for p in RunDir(run_dir).tracking.iterdir() if p.is_dir() and p.name not in ("mlruns", "wandb")
    ]
    accumulator = EventAccumulator(str(folder))  # purges what a resumed writer's purge_step orphaned
    accumulator.Reload()
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def test_trackers_follow_a_run_through_a_resume(tmp_path: Path, tones_corpus: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    command = engine_command(
        run_dir,
        tones_corpus,
        1,
        "train.max_steps=10",
        "train.global_batch_size=8",
        "logging.steps=1",
        "eval.steps=4",
        "eval.at_start=false",
        "checkpoint.save_steps=4",
        "logging.report_to=[tensorboard, mlflow, wandb]",
    )
    log = RunDir(run_dir).rank_log(0)
    kill_when(command, lambda: log.exists() and '"step": 6, "epoch": 0.75' in log.read_text(), "step 6")
    # Resumes from step 4 (steps 5 and 6 trained and logged again) with what a resume may change changed:
    # MLflow refuses a parameter logged again with another value.
    run([*command, "cluster.time_min=90", "eval.hang_timeout_s=500"])
    records = [json.loads(line) for line in log.read_text().splitlines()]
    replayed = [r["step"] for r in records if r["kind"] == "train" and r["attempt"] == 0 and r["step"] > 4]
    resumed = [r for r in records if r["kind"] == "meta" and r["attempt"] == 1 and not r.get("event")]
    assert replayed and resumed[0]["resumed_from"] == 4  # steps past 4 were logged, then trained again
    train_loss = scalars(run_dir, "train/loss")
    assert [s for s, _ in train_loss] == list(range(1, 11))  # every step once, replayed ones replaced
    final = {r["step"]: r["loss"] for r in records if r["kind"] == "train"}  # the last attempt wins
    assert all(v == pytest.approx(final[s], rel=1e-6) for s, v in train_loss)
    assert [s for s, _ in scalars(run_dir, "eval/wer")] == [4, 8, 10]
    for tag in ("train/lr", "train/grad_norm", "train/samples_per_s", "eval/loss"):
        assert scalars(run_dir, tag), tag

    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # what the trainer sets for its own store

    tracking = RunDir(run_dir).tracking
    run_id = (tracking / "mlflow_run_id").read_text().strip()
    client = MlflowClient(tracking_uri=(tracking / "mlruns").resolve().as_uri())
    history = client.get_metric_history(run_id, "train/loss")
    assert {m.step for m in history} == set(range(1, 11))  # one run across both attempts
    params = client.get_run(run_id).data.params
    assert params["train.global_batch_size"] == "8" and not any(p.startswith("cluster.") for p in params)

    offline = sorted((tracking / "wandb").glob("offline-run-*"))
    kept = (tracking / "wandb_run_id").read_text().strip()
    assert len(offline) == 2 and {p.name.rsplit("-", 1)[-1] for p in offline} == {kept}  # the same run id
    data = b"".join(p.read_bytes() for run in offline for p in run.glob("*.wandb"))
    assert b"train/loss" in data and b"eval/wer" in data
