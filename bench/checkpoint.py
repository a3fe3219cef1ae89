"""Checkpoint save/load time and size (smoke model and a wav2vec2-base-sized model built from its config,
~95M parameters, no download), and the time from a job's restart to its first new training step on the
local SLURM cluster, for a requeue and for a restart inside the allocation. Targets: base model written in
under 5 s; requeue to first step under 30 s; an in-job restart's stop to next step under 15 s.

    python bench/checkpoint.py [--skip-cluster]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

from asrlaunch.core.recipe import ModelSection
from asrlaunch.core.records import Kind, is_start
from asrlaunch.core.rundir import RunDir
from asrlaunch.engine import checkpoint

ROOT = Path(__file__).resolve().parents[1]
VOCAB = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz'|")} | {"[UNK]": 28, "[PAD]": 29}


def measure_checkpoint(label: str, section: ModelSection, work: Path) -> None:
    import torch
    from accelerate import Accelerator

    from asrlaunch.engine.model import build_model

    accelerator = Accelerator(cpu=True)
    model = build_model(section, len(VOCAB), 29)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    labels = torch.randint(0, 28, (2, 10))
    model(input_values=torch.randn(2, 16000), labels=labels).loss.backward()
    optimizer.step()  # so that the optimizer holds its moments
    params = sum(p.numel() for p in model.parameters())
    folder = work / label
    start = time.perf_counter()
    saved = checkpoint.save(accelerator, folder, 1, {"step": 1}, keep_last=2)
    save_s = time.perf_counter() - start
    size = sum(f.stat().st_size for f in saved.rglob("*") if f.is_file())
    start = time.perf_counter()
    found = checkpoint.newest_complete(folder)
    assert found is not None
    accelerator.load_state(str(found[0]))
    load_s = time.perf_counter() - start
    print(
        f"{label:<22} {params / 1e6:7.1f}M params  {size / 2**20:8.1f} MiB  save {save_s:5.2f} s  "
        f"verify+load {load_s:5.2f} s"
    )


def restart_to_first_step(work: Path, how: str) -> None:
    """Stop a running smoke job, then time the next attempt's first step: `requeue` (USR2: checkpoint,
    requeue, SLURM's requeue delay, a new job start) or `restart` (kill -9 of its rank: failover restarts
    the step inside the allocation)."""
    name = f"restart-{how}"
    submit = [
        sys.executable,
        "-m",
        "asrlaunch",
        "submit",
        str(ROOT / "recipes" / "smoke.yaml"),
        f"data.dir={work}/corpus",
        f"data.cache_dir={work}/cache",
        f"run.name={name}",
        "train.max_steps=2000",
        "logging.steps=1",
        "checkpoint.save_steps=10",
        "eval.at_start=false",
        "eval.steps=5000",
        "cluster.cpus_per_task=1",
        "--executor",
        "slurm",
    ]
    out = subprocess.run(submit, cwd=work, capture_output=True, text=True, check=True).stdout
    job_id = out.split("job ")[1].split(":")[0]
    log = RunDir(work / "runs" / name).rank_log(0)

    def records() -> list[dict]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    while not any(r["kind"] == Kind.TRAIN and r["step"] >= 12 for r in records()):
        time.sleep(0.5)
    signalled = time.time()
    if how == "requeue":
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    else:
        subprocess.run(["pkill", "-KILL", "-f", f"submitit.core._submit {work}/runs/{name}/"], check=True)
    while not any(r["kind"] == Kind.TRAIN and r["attempt"] == 1 for r in records()):
        time.sleep(0.5)
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    start = datetime.fromisoformat(shown.split("StartTime=")[1].split()[0]).timestamp()
    ended = max(r["time"] for r in records() if r["attempt"] == 0)
    restarted = [r for r in records() if is_start(r) and r["attempt"] == 1]
    began = start if how == "requeue" else min(r.get("process_started") or r["time"] for r in restarted)
    first = next(r["time"] for r in records() if r["kind"] == Kind.TRAIN and r["attempt"] == 1)
    subprocess.run(["scancel", job_id], check=False)
    since = "the requeued job's start" if how == "requeue" else "the restarted process's start"
    print(
        f"{how:<8} stop -> next step: {first - ended:5.1f} s from the end of the stopped step "
        f"({first - signalled:5.1f} s from the signal); {first - began:5.1f} s from {since}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skip-cluster", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    smoke = yaml.safe_load((ROOT / "recipes" / "smoke.yaml").read_text())["model"]
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        work = Path(tmp)
        measure_checkpoint("smoke model", ModelSection(**smoke), work)
        measure_checkpoint("wav2vec2-base config", ModelSection(config={}, freeze_feature_encoder=True), work)
        if not args.skip_cluster and subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0:
            from asrlaunch.data.synth import generate_corpus

            generate_corpus(work / "corpus", train=400, test=10)
            restart_to_first_step(work, "restart")
            restart_to_first_step(work, "requeue")


if __name__ == "__main__":
    main()
