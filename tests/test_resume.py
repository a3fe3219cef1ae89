"""Checkpoints and exact resume on CPU: kill -9, torn and corrupt checkpoints, world-size change, finished."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from asrlaunch.core.logs import read_run_logs
from asrlaunch.core.records import is_start
from asrlaunch.core.rundir import RunDir
from asrlaunch.engine import checkpoint
from asrlaunch.results.merge import merge_records

from .conftest import BackgroundRun, engine_command, kill_tree, python_env

pytestmark = pytest.mark.slow
DROPOUT_ON = (
    "model.config.hidden_dropout=0.1",
    "model.config.attention_dropout=0.1",
    "model.config.activation_dropout=0.05",
    "model.config.feat_proj_dropout=0.1",
    "model.config.mask_time_prob=0.05",
    "model.config.mask_time_length=2",
)


SHORT_RUN = (
    "train.max_steps=12",
    "train.max_micro_batch_size=4",
    "checkpoint.save_steps=5",
    "checkpoint.keep_last=3",
    "logging.steps=1",
    "logging.sample_ids=true",
    "eval.steps=100",
    "eval.at_start=false",
)


def command(run_dir: Path, corpus: Path, processes: int, *overrides: str) -> list[str]:
    return engine_command(run_dir, corpus, processes, *SHORT_RUN, *overrides)


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        cmd, env=python_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def kill_when(cmd: list[str], ready: Callable[[], bool], what: str, poll_s: float = 0.05) -> None:
    """Start training and kill -9 its whole process tree (torchrun and its workers) once `ready()` holds."""
    process = subprocess.Popen(
        cmd,
        env=python_env(OMP_NUM_THREADS="1"),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not ready():
        assert process.poll() is None, f"training ended before {what}"
        assert time.monotonic() < deadline
        time.sleep(poll_s)
    kill_tree(process.pid)
    process.wait()


def run_and_kill_after_checkpoint(cmd: list[str], run_dir: Path, step: int) -> None:
    """Start training, kill -9 the whole process group once checkpoint `step` is complete."""
    manifest = checkpoint.step_dir(run_dir / "checkpoints", step) / checkpoint.MANIFEST
    kill_when(cmd, manifest.exists, "the checkpoint was written")
    assert not (run_dir / "final").exists()


def kill_while_writing_a_checkpoint(cmd: list[str], run_dir: Path, tries: int = 5) -> None:
    """kill -9 the process group while a checkpoint is half written, an earlier one complete: as soon as its
    partial folder holds a file. A kill that lands just after the rename is retried (the next start resumes
    and saves again)."""
    checkpoints = run_dir / "checkpoints"

    def half_written() -> bool:
        complete = any(
            (p / checkpoint.MANIFEST).exists() for _, p in checkpoint.list_checkpoints(checkpoints)
        )
        return complete and any(any(p.iterdir()) for p in checkpoints.glob(".step-*.partial"))

    for _ in range(tries):
        kill_when(cmd, half_written, "a checkpoint was caught mid-write", poll_s=0.001)
        if list(checkpoints.glob(".step-*.partial")):
            return
    pytest.fail(f"no kill landed inside a checkpoint write in {tries} tries")


def keep_only_checkpoint(run_dir: Path, step: int) -> None:
    """Resume from exactly `step`, whatever the killed run reached (the kill races with training)."""
    import shutil

    for found, folder in checkpoint.list_checkpoints(run_dir / "checkpoints"):
        if found != step:
            shutil.rmtree(folder)


def weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


def step_losses(run_dir: Path) -> dict[int, float]:
    return merge_records(read_run_logs(run_dir)).train


def sample_ids(run_dir: Path) -> dict[int, list[str]]:
    ids: dict[int, list[str]] = {}
    for record in read_run_logs(run_dir):
        if record["kind"] == "train":
            ids[record["step"]] = sorted(record["sample_ids"])  # the last attempt wins
    return ids


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory, tones_corpus: Path) -> Path:
    """The uninterrupted 1-process run (dropout off) the interrupted ones are compared with (read only)."""
    run_dir = tmp_path_factory.mktemp("plain") / "run"
    run(command(run_dir, tones_corpus, 1))
    return run_dir


def test_kill_9_and_resume_is_bitwise_exact_with_dropout(tmp_path: Path, tones_corpus: Path) -> None:
    import torch

    # One thread each: the uninterrupted run trains on the other core meanwhile.
    straight = BackgroundRun(tmp_path / "straight", tones_corpus, 1, *SHORT_RUN, *DROPOUT_ON)
    resumed = tmp_path / "resumed"
    cmd = command(resumed, tones_corpus, 1, *DROPOUT_ON)
    run_and_kill_after_checkpoint(cmd, resumed, 5)
    second = run(cmd)
    a, b = weights(straight.result()), weights(resumed)
    assert "resuming from" in second.stdout
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert step_losses(straight.run_dir) == step_losses(resumed)
    metas = [r for r in read_run_logs(resumed) if is_start(r)]
    assert [m["attempt"] for m in metas] == [0, 1]
    assert metas[1]["resumed_from"] in (5, 10)


def test_the_reference_order_resumes_in_the_middle_of_an_epoch_bitwise(
    tmp_path: Path, tones_corpus: Path
) -> None:
    """The Trainer's order at a global batch of 12 (6 steps per epoch, the last partial): killed after the
    checkpoint of step 5, in the middle of epoch 0, then resumed: the same samples, losses and weights."""
    import torch

    order = ("data.order=reference", "train.global_batch_size=12", "train.max_micro_batch_size=3")
    straight = BackgroundRun(tmp_path / "straight", tones_corpus, 1, *SHORT_RUN, *order)
    resumed = tmp_path / "resumed"
    cmd = command(resumed, tones_corpus, 1, *order)
    run_and_kill_after_checkpoint(cmd, resumed, 5)
    keep_only_checkpoint(resumed, 5)
    assert "resuming from" in run(cmd).stdout
    a, b = weights(straight.result()), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert step_losses(straight.run_dir) == step_losses(resumed)
    assert sample_ids(straight.run_dir) == sample_ids(resumed) and len(sample_ids(resumed)[6]) == 4


def test_world_size_2_to_1_keeps_samples_and_weights(tmp_path: Path, tones_corpus: Path, plain: Path) -> None:
    straight, changed = plain, tmp_path / "changed"
    run_and_kill_after_checkpoint(command(changed, tones_corpus, 2), changed, 5)
    keep_only_checkpoint(changed, 5)  # 2 processes accumulate 4 micro-batches, 1 process 8: 20 % 8 != 0
    moved = run(command(changed, tones_corpus, 1))
    assert "(step 5," in moved.stdout and "saved by 2 processes" in moved.stdout
    metas = [r for r in read_run_logs(changed) if is_start(r) and r["rank"] == 0]
    assert [(m["world_size"], m["resumed_from"]) for m in metas] == [(2, None), (1, 5)]
    assert sample_ids(straight) == sample_ids(changed)
    a, b = weights(straight), weights(changed)
    total = (
        sum(float((a[k] - b[k]).norm() ** 2) for k in a) ** 0.5
        / sum(float(a[k].norm() ** 2) for k in a) ** 0.5
    )
    assert total < 1e-5
    for key in a:
        if key.endswith("k_proj.bias"):
            # Softmax ignores a shift of every logit, so the key bias has a zero gradient up to rounding,
            # which Adam's normalisation amplifies: it drifts without any effect on outputs.
            continue
        assert float((a[key] - b[key]).norm() / a[key].norm()) < 1e-5, key
    for step, loss in step_losses(straight).items():
        assert step_losses(changed)[step] == pytest.approx(loss, rel=1e-5)


def test_pruning_after_a_fallback_keeps_the_good_checkpoints(tmp_path: Path) -> None:
    """keep_last=1; step 200 is corrupt, so the run fell back to 100 and now writes 150: 150 stays (and 200,
    which the run replaces when it gets there); before, 200 counted as the newest and 150 and 100 went."""
    checkpoints = tmp_path / "checkpoints"
    for step in (100, 200, 150):
        folder = checkpoint.step_dir(checkpoints, step)
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(bytes(64))
        checkpoint.write_manifest(folder, step, {})
        if step == 200:
            (folder / "model.safetensors").write_bytes(bytes([1]) * 64)  # corrupt, same size
    checkpoint.prune(checkpoints, keep_last=1, written=150)
    assert [step for step, _ in checkpoint.list_checkpoints(checkpoints)] == [200, 150]
    with pytest.warns(UserWarning, match="checksum differs"):
        found = checkpoint.newest_complete(checkpoints)
    assert found is not None and found[0] == checkpoint.step_dir(checkpoints, 150)


def test_torn_and_corrupt_checkpoints_are_skipped_and_finished_runs_exit(
    tmp_path: Path, tones_corpus: Path
) -> None:
    run_dir = tmp_path / "run"
    cmd = command(run_dir, tones_corpus, 1)
    run(cmd)
    records = len(read_run_logs(run_dir))
    again = run(cmd)  # finished: exits before loading anything, trains nothing
    assert "finished already" in again.stdout and "corpus:" not in again.stdout
    assert len(read_run_logs(run_dir)) == records

    checkpoints = run_dir / "checkpoints"
    assert [s for s, _ in checkpoint.list_checkpoints(checkpoints)] == [10, 5]
    RunDir(run_dir).finished_marker.unlink()  # pretend the run did not finish
    # a resume that ends before its checkpoint is refused (it would call the step-10 model step 7's)
    shortened = subprocess.run([*cmd, "train.max_steps=7"], env=python_env(), capture_output=True, text=True)
    assert shortened.returncode == 2 and "before its step-10 checkpoint" in shortened.stderr
    # a writer killed mid-checkpoint leaves a partial folder (never a step folder with a manifest) ...
    torn = checkpoints / ".step-000011.partial"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"half")
    # ... or, from an older version of the protocol, a step folder without its manifest
    (checkpoints / "step-000012").mkdir()
    # and a flipped byte in the newest complete one
    target = checkpoints / "step-000010" / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.warns(UserWarning) as caught:
        found = checkpoint.newest_complete(checkpoints)
    assert found is not None and found[0].name == "step-000005"
    messages = [str(w.message) for w in caught]
    assert any("step-000012: no manifest.json" in m for m in messages)
    assert any("step-000010/model.safetensors: checksum differs" in m for m in messages)
    resumed = run(cmd)
    assert "resuming from" in resumed.stdout and "step-000005" in resumed.stdout
    assert "skipping checkpoint" in resumed.stderr
    last_meta = [r for r in read_run_logs(run_dir) if is_start(r)][-1]
    assert last_meta["resumed_from"] == 5 and last_meta["attempt"] == 2  # the refused start was attempt 1
    assert not torn.exists()  # stale partial folders are cleaned at the next save


def test_kill_9_while_writing_a_checkpoint_resumes_from_the_previous_one(
    tmp_path: Path, tones_corpus: Path, plain: Path
) -> None:
    import torch

    straight, killed = plain, tmp_path / "killed"
    cmd = command(killed, tones_corpus, 1, "checkpoint.save_steps=1", "checkpoint.keep_last=2")
    kill_while_writing_a_checkpoint(cmd, killed)
    checkpoints = killed / "checkpoints"
    (partial,) = checkpoints.glob(".step-*.partial")
    torn_step = int(partial.name.split("-")[1].split(".")[0])
    found = checkpoint.newest_complete(checkpoints)
    assert found is not None  # the kill came after a complete checkpoint, which the resume must use
    assert torn_step not in [s for s, _ in checkpoint.list_checkpoints(checkpoints)]
    assert int(found[0].name.split("-")[1]) < torn_step

    resumed = run(cmd)
    assert f"resuming from {found[0]}" in resumed.stdout
    a, b = weights(straight), weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert step_losses(straight) == step_losses(killed)


def test_deepspeed_zero2_and_zero1_resume_exactly_and_on_another_world_size(
    tmp_path: Path, tones_corpus: Path
) -> None:
    """ZeRO-2 over gloo: kill -9 and resume on 2 processes is bitwise exact (dropout on). ZeRO-1: trained and
    checkpointed on 2 processes, its shards resumed on 1 through DeepSpeed's universal checkpoint format, and
    a corrupt newest checkpoint falls back to the older one (of the other world size)."""
    import torch

    deepspeed = ("train.backend=deepspeed", "train.zero_stage=2")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(command(straight, tones_corpus, 2, *deepspeed, *DROPOUT_ON))
    cmd = command(resumed, tones_corpus, 2, *deepspeed, *DROPOUT_ON)
    run_and_kill_after_checkpoint(cmd, resumed, 5)
    keep_only_checkpoint(resumed, 5)
    assert (checkpoint.step_dir(resumed / "checkpoints", 5) / "pytorch_model").is_dir()  # ZeRO shards
    assert "step-000005 (step 5," in run(cmd).stdout
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert step_losses(straight) == step_losses(resumed)

    deepspeed = ("train.backend=deepspeed", "train.zero_stage=1")
    plain, changed = tmp_path / "plain", tmp_path / "changed"
    run(command(plain, tones_corpus, 2, *deepspeed))
    run_and_kill_after_checkpoint(command(changed, tones_corpus, 2, *deepspeed), changed, 5)
    keep_only_checkpoint(changed, 5)
    moved = run(command(changed, tones_corpus, 1, *deepspeed))
    assert "(step 5," in moved.stdout and "saved by 2 processes, ZeRO state through" in moved.stdout
    assert sample_ids(plain) == sample_ids(changed)
    a, b = weights(plain), weights(changed)
    total = (
        sum(float((a[k] - b[k]).norm() ** 2) for k in a) ** 0.5
        / sum(float(a[k].norm() ** 2) for k in a) ** 0.5
    )
    assert total < 1e-5
    for step, loss in step_losses(plain).items():
        assert step_losses(changed)[step] == pytest.approx(loss, rel=1e-5)

    # The newest checkpoint (world size 1) is corrupt; its fallback has the ZeRO shards of 2 processes.
    # Which loader to use follows the checkpoint that passes verification, not the newest one on disk.
    RunDir(changed).finished_marker.unlink()
    assert [s for s, _ in checkpoint.list_checkpoints(changed / "checkpoints")] == [10, 5]
    target = next((checkpoint.step_dir(changed / "checkpoints", 10) / "pytorch_model").rglob("*.pt"))
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    again = run(command(changed, tones_corpus, 1, *deepspeed))
    assert "checksum differs" in again.stderr
    resumed_line = next(line for line in again.stdout.splitlines() if line.startswith("resuming from"))
    assert (
        "step-000005 (step 5," in resumed_line and "saved by 2 processes, ZeRO state through" in resumed_line
    )
    assert sample_ids(plain) == sample_ids(changed)
    for step, loss in step_losses(plain).items():
        assert step_losses(changed)[step] == pytest.approx(loss, rel=1e-5)


def test_deepspeed_trains_in_bf16_on_cpu(tmp_path: Path, tones_corpus: Path) -> None:
    """DeepSpeed holds the model in bf16 and does not autocast: the audio is cast to the engine's dtype (as
    the Trainer's _prepare_input), else the first convolution fails on a dtype mismatch."""
    rest = ("train.max_micro_batch_size=8", "logging.steps=1", "eval.steps=3", "eval.at_start=false")
    losses = {}
    for precision in ("bf16", "no"):
        run_dir = tmp_path / precision
        settings = ("train.backend=deepspeed", f"train.mixed_precision={precision}", "train.max_steps=3")
        run(engine_command(run_dir, tones_corpus, 1, *settings, *rest))
        records = read_run_logs(run_dir)
        losses[precision] = [r["loss"] for r in records if r["kind"] == "train"]
        assert [r["eval_samples"] for r in records if r["kind"] == "eval"] == [16]
    assert len(losses["bf16"]) == 3 and all(isinstance(x, float) for x in losses["bf16"])
    assert losses["bf16"] != losses["no"]  # bf16's rounding shows: the run did not fall back to fp32
    assert losses["bf16"] == pytest.approx(losses["no"], rel=0.05)


def test_every_rank_resumes_its_own_logging_window(tmp_path: Path, tones_corpus: Path) -> None:
    """A checkpoint inside a logging window (step 6 of windows of 4 steps): after the resume every rank's next
    train record is what it was uninterrupted; before, every rank took rank 0's window."""
    window = ("logging.steps=4", "checkpoint.save_steps=2")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(command(straight, tones_corpus, 2, *window))
    cmd = command(resumed, tones_corpus, 2, *window)
    run_and_kill_after_checkpoint(cmd, resumed, 6)
    keep_only_checkpoint(resumed, 6)
    run(cmd)
    starts = [r for r in read_run_logs(resumed) if is_start(r) and r["attempt"] == 1]
    assert [r["resumed_from"] for r in starts] == [6, 6]  # both ranks, from the checkpoint inside a window

    def losses(run_dir: Path) -> dict[tuple[int, int], float]:  # (rank, step): the last attempt's
        return {(r["rank"], r["step"]): r["loss"] for r in read_run_logs(run_dir) if r["kind"] == "train"}

    assert losses(straight) == losses(resumed) and set(losses(straight)) == {
        (0, 4),
        (0, 8),
        (0, 12),
        (1, 4),
        (1, 8),
        (1, 12),
    }
    assert losses(straight)[(0, 8)] != losses(straight)[(1, 8)]  # the ranks' windows differ


def test_ddp_on_2_processes_kill_9_and_resume_is_bitwise_exact_with_dropout(
    tmp_path: Path, tones_corpus: Path
) -> None:
    """Per-rank RNG restored under DDP: dropout and SpecAugment draw the same masks after the resume. Also:
    `checkpoint.keep_last=2` after five checkpoints leaves exactly the newest two."""
    import torch

    every_2 = ("checkpoint.save_steps=2", "checkpoint.keep_last=2")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(command(straight, tones_corpus, 2, *DROPOUT_ON, *every_2))
    assert [step for step, _ in checkpoint.list_checkpoints(straight / "checkpoints")] == [10, 8]
    cmd = command(resumed, tones_corpus, 2, *DROPOUT_ON, *every_2)
    run_and_kill_after_checkpoint(cmd, resumed, 6)
    run(cmd)
    starts = [r for r in read_run_logs(resumed) if is_start(r)]
    assert sorted({s["attempt"] for s in starts}) == [0, 1] and starts[-1]["resumed_from"] >= 6
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert step_losses(straight) == step_losses(resumed)
