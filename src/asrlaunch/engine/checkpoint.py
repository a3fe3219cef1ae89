"""Self-describing, atomic checkpoints: <run_dir>/checkpoints/step-NNNNNN/ with manifest.json written last.

A checkpoint is written into `.step-NNNNNN.partial`, its manifest (every file's size and sha256) is written
last, then the folder is renamed into place: a writer killed at any moment leaves either the previous
checkpoints or a partial folder, never a step folder that looks complete. Loading verifies the manifest;
a torn or corrupt checkpoint is skipped with a warning naming it. The file helpers need no torch.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from asrlaunch.job.heartbeat import waiting

MANIFEST, STATE = "manifest.json", "trainer_state.json"
STEP_DIR = re.compile(r"^step-(\d{6,})$")
STALE = (".step-*.partial", ".universal-step-*")  # partial_dir and universal_dir folders
FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete or does not match its manifest."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (a full disk, ...): its partial folder is removed, the older
    checkpoints stay; the message names the folder and the space needed."""


def step_dir(checkpoints: Path, step: int) -> Path:
    return checkpoints / f"step-{step:06d}"


def partial_dir(checkpoints: Path, step: int) -> Path:
    """Where a checkpoint is written before it is complete (never loaded)."""
    return checkpoints / f".step-{step:06d}.partial"


def universal_dir(folder: Path) -> Path:
    """Beside a ZeRO checkpoint: its conversion to DeepSpeed's universal format (the original stays as is)."""
    return folder.parent / f".universal-{folder.name}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with path.open("rb") as file:
        os.fsync(file.fileno())


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def flush_tree(folder: Path) -> None:
    """Every file below `folder`, then the folder itself, on disk: what a marker written next vouches for."""
    for path in folder.rglob("*"):
        if path.is_file():
            _fsync_file(path)
    _fsync_dir(folder)


def flush_written(folder: Path) -> list[str]:
    """Every file below `folder` this process sees, flushed to disk from here (only the node that wrote a file
    can flush what it holds of it: each rank flushes its own shards), by its name relative to `folder`."""
    names = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        _fsync_file(path)
        names.append(str(path.relative_to(folder)))
    return names


def _appears(path: Path, within_s: float = 5.0) -> bool:
    """Whether `path` is a file, asked again for a few seconds (a shared file system may show it late)."""
    deadline = time.monotonic() + within_s
    while not path.is_file():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
    return True


def write_manifest(
    folder: Path, step: int, extra: dict[str, Any], written: Iterable[str] = ()
) -> dict[str, Any]:
    """Hash every file, flush it to disk, then write the manifest (itself via a temporary file). `written`:
    what the other ranks wrote, which a shared file system's listing may not show this node yet; one that
    cannot be found fails the checkpoint, rather than being left out of the manifest unchecked."""
    listed = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST}
    files = {}
    for name in sorted(listed | set(written)):
        path = folder / name
        if not _appears(path):
            raise OSError(errno.ENOENT, f"written by another rank but not found by rank 0: {path}")
        _fsync_file(path)
        files[name] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {"format": FORMAT, "step": step, "created": time.time(), "files": files, **extra}
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    _fsync_file(tmp)
    os.replace(tmp, folder / MANIFEST)
    return manifest


def publish(partial: Path, final: Path) -> None:
    """Rename a finished checkpoint into place (replacing an older one of the same step)."""
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)
    _fsync_dir(final.parent)


def verify(folder: Path) -> dict[str, Any]:
    """The manifest of a complete, intact checkpoint; CheckpointError naming the problem otherwise."""
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        raise CheckpointError(f"{folder}: no {MANIFEST} (its writer was stopped before finishing)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError:
        raise CheckpointError(f"{manifest_path}: not valid JSON") from None
    for name, expected in manifest["files"].items():
        path = folder / name
        if not path.exists():
            raise CheckpointError(f"{path}: listed in the manifest but missing")
        if path.stat().st_size != expected["size"]:
            raise CheckpointError(
                f"{path}: {path.stat().st_size} bytes, the manifest says {expected['size']}"
            )
        if _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"{path}: checksum differs from the manifest (corrupt)")
    return dict(manifest)


def list_checkpoints(checkpoints: Path) -> list[tuple[int, Path]]:
    """Step folders, newest first (partial folders are not listed)."""
    if not checkpoints.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoints.iterdir() if (m := STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def newest_complete(checkpoints: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that passes verification; every one skipped is warned of by name."""
    for _, folder in list_checkpoints(checkpoints):
        try:
            return folder, verify(folder)
        except CheckpointError as error:
            warnings.warn(f"skipping checkpoint: {error}", stacklevel=2)
    return None


def prune(checkpoints: Path, keep_last: int, written: int) -> None:
    """Keep the newest `keep_last` complete checkpoints up to the step just `written`; remove older ones and
    stale partial folders. A newer one is one a resume fell back past (corrupt): it does not count, else it
    would push out the good ones, the one just written included; the run replaces it when it gets there."""
    complete = [p for step, p in list_checkpoints(checkpoints) if (p / MANIFEST).exists() and step <= written]
    for folder in complete[keep_last:]:
        shutil.rmtree(folder, ignore_errors=True)
    for stale in [p for pattern in STALE for p in checkpoints.glob(pattern)]:
        shutil.rmtree(stale, ignore_errors=True)


def read_state(folder: Path) -> dict[str, Any]:
    return dict(json.loads((folder / STATE).read_text()))


def folder_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20 if folder.is_dir() else 0.0


def free_mib(folder: Path) -> float:
    return shutil.disk_usage(folder).free / 2**20 if folder.is_dir() else 0.0


def out_of_space(error: BaseException | None, folder: Path) -> bool:
    """A full disk shows as ENOSPC, or (torch's zip writer) as a RuntimeError with the disk left full."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return error is not None and free_mib(folder) < 1.0


def checkpoint_mib(checkpoints: Path, step: int) -> float:
    """What a checkpoint takes: the newest complete one's size, else what the partial one reached."""
    newest = next((p for _, p in list_checkpoints(checkpoints) if (p / MANIFEST).exists()), None)
    return folder_mib(newest) if newest else folder_mib(partial_dir(checkpoints, step))


def write_failure(checkpoints: Path, step: int, error: BaseException | None, need: float) -> str:
    """The one line a user needs: which folder, what happened, how much space it takes, what to do."""
    if error is None:
        return f"{checkpoints}: the step-{step} checkpoint failed on another rank (see its log)"
    free = free_mib(checkpoints)
    what = "no space left on device" if out_of_space(error, checkpoints) else str(error).splitlines()[0]
    return (
        f"{checkpoints}: {what} writing the step-{step} checkpoint (it needs about {need:.0f} MiB, "
        f"{free:.0f} MiB are free); free space or move the run, or set checkpoint.on_error=continue"
    )


def _anyone(accelerator: Any, failed: bool) -> bool:
    """All ranks agree whether any of them failed (one all-reduce), so none waits for a peer that gave up."""
    if accelerator.num_processes == 1:
        return failed
    import torch

    flag = torch.tensor([1.0 if failed else 0.0], device=accelerator.device)
    with waiting():
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def _write_shards(accelerator: Any, partial: Path) -> Exception | None:
    from safetensors import SafetensorError  # how safetensors reports an I/O error (a full disk)

    try:
        accelerator.save_state(str(partial), safe_serialization=True)
    except (OSError, RuntimeError, SafetensorError) as problem:  # torch's zip writer: RuntimeError
        return problem
    return None


def _everyone_flushed(accelerator: Any, partial: Path) -> tuple[list[str], OSError | None, bool]:
    """One rank per node flushes what it sees of the checkpoint (fsync: only the node that wrote a file can
    flush what it holds of it); every such rank's file names, this rank's error, and whether another rank
    failed (all ranks call this, after every write is done)."""
    mine: list[str] = []
    problem: OSError | None = None
    if accelerator.is_local_main_process:
        try:
            mine = flush_written(partial)
        except OSError as error:
            problem = error
    if accelerator.num_processes == 1:
        return mine, problem, False
    from accelerate.utils import gather_object

    with waiting():
        reports = gather_object([(mine, problem is not None)])
    peer_failed = problem is None and any(failed for _, failed in reports)
    return sorted({name for names, _ in reports for name in names}), problem, peer_failed


def _barrier(accelerator: Any) -> None:
    with waiting():
        accelerator.wait_for_everyone()


def save(accelerator: Any, checkpoints: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Every rank calls this at the same step boundary (accelerate writes per-rank RNG and shards). A write
    that fails on any rank (a full disk) fails on all of them with CheckpointWriteError; the partial folder
    is removed and nothing older is touched (pruning happens only after a checkpoint is complete)."""
    partial, final = partial_dir(checkpoints, step), step_dir(checkpoints, step)
    error: Exception | None = None
    try:
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
    except OSError as problem:
        error = problem
    # Agreed before the shards are written (and a barrier too): every rank then makes the same collectives.
    if not _anyone(accelerator, error is not None):
        error = _write_shards(accelerator, partial)
    if not _anyone(accelerator, error is not None):  # every rank's write is done: what each sees is final
        written, error, peer_failed = _everyone_flushed(accelerator, partial)
        if error is None and not peer_failed and accelerator.is_main_process:
            try:
                (partial / STATE).write_text(json.dumps(state, indent=1))
                write_manifest(partial, step, {"world_size": accelerator.num_processes}, written)
                publish(partial, final)
            except OSError as problem:
                error = problem
    if _anyone(accelerator, error is not None):
        # One verdict for every rank: a crash (failover may retry it) unless the disk is what failed
        crash = _anyone(accelerator, error is not None and not out_of_space(error, checkpoints))
        need = checkpoint_mib(checkpoints, step)
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        _barrier(accelerator)
        message = write_failure(checkpoints, step, error, need)
        if crash:
            raise error or CheckpointError(
                f"the checkpoint of step {step} failed on another rank (see its error)"
            )
        raise CheckpointWriteError(message)
    if accelerator.is_main_process:
        prune(checkpoints, keep_last, step)
    _barrier(accelerator)
    return final


def load(accelerator: Any, folder: Path, universal: bool) -> dict[str, Any]:
    """Model, optimizer, scheduler, scaler and RNG from `folder` into every rank (`universal`: ZeRO shards of
    another world size, converted once, on rank 0); the trainer's own state returned."""
    source = folder
    if universal:
        source = universal_dir(folder)
        if accelerator.is_main_process:
            to_universal(folder)
        accelerator.wait_for_everyone()
    accelerator.load_state(str(source))
    # accelerate restores its micro-step counter, which is only right for the accumulation it was saved
    # with; checkpoints are taken on optimizer-step boundaries, so on any world size it restarts at 0.
    accelerator.step = 0
    return read_state(folder)


def to_universal(folder: Path) -> Path:
    """A ZeRO checkpoint converted to DeepSpeed's universal format, loadable on any world size.

    Written beside the checkpoint (`.universal-step-NNNNNN/`, the same layout as accelerate's save_state:
    `pytorch_model/` plus the scheduler and RNG files), so that the verified checkpoint stays untouched.
    """
    import subprocess
    import sys

    target = universal_dir(folder)
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            str(folder / "pytorch_model"),
            "--output_folder",
            str(target / "pytorch_model"),
            "--num_extract_workers",
            "1",
            "--num_merge_workers",
            "1",
            "--inject_missing_state",
        ],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise CheckpointError(
            f"{folder}: conversion to DeepSpeed's universal format failed:\n{done.stderr[-2000:]}"
        )
    for path in folder.iterdir():
        if path.is_file() and path.name not in (MANIFEST, "latest"):
            shutil.copy(path, target / path.name)
    return target
