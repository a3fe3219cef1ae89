"""Self-describing, atomic checkpoints: <run_dir>/checkpoints/step-NNNNNN/ with manifest.json written last.

A checkpoint is written into `.step-NNNNNN.partial`, its manifest (every file's size and sha256) is written
last, then the folder is renamed into place: a writer killed at any moment leaves either the previous
checkpoints or a partial folder, never a step folder that looks complete. Loading verifies the manifest;
a torn or corrupt checkpoint is skipped with a warning naming it. The file helpers need no torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

MANIFEST, STATE = "manifest.json", "trainer_state.json"
STEP_DIR = re.compile(r"^step-(\d{6,})$")
STALE = (".step-*.partial", ".universal-step-*")  # partial_dir and universal_dir folders
FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete or does not match its manifest."""


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


def write_manifest(folder: Path, step: int, extra: dict[str, Any]) -> dict[str, Any]:
    """Hash every file, flush it to disk, then write the manifest (itself via a temporary file)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        _fsync_file(path)
        files[str(path.relative_to(folder))] = {"size": path.stat().st_size, "sha256": _sha256(path)}
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
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def prune(checkpoints: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints; remove older ones and stale partial folders."""
    complete = [p for _, p in list_checkpoints(checkpoints) if (p / MANIFEST).exists()]
    for folder in complete[keep_last:]:
        shutil.rmtree(folder, ignore_errors=True)
    for stale in [p for pattern in STALE for p in checkpoints.glob(pattern)]:
        shutil.rmtree(stale, ignore_errors=True)


def read_state(folder: Path) -> dict[str, Any]:
    return dict(json.loads((folder / STATE).read_text()))


def save(accelerator: Any, checkpoints: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Every rank calls this at the same step boundary (accelerate writes per-rank RNG and shards)."""
    partial = partial_dir(checkpoints, step)
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial), safe_serialization=True)
    accelerator.wait_for_everyone()
    final = step_dir(checkpoints, step)
    if accelerator.is_main_process:
        (partial / STATE).write_text(json.dumps(state, indent=1))
        write_manifest(partial, step, {"world_size": accelerator.num_processes})
        publish(partial, final)
        prune(checkpoints, keep_last)
    accelerator.wait_for_everyone()
    return final


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
