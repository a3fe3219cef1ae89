"""The torch.distributed environment of a SLURM task (srun starts one task per device). No torch.

torchrun and accelerate set RANK/WORLD_SIZE/MASTER_ADDR themselves; under srun we derive them from
SLURM's variables. The master address is the first node's address as SLURM reports it (NodeAddr),
because node names need not resolve (on the local cluster they do not).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Mapping

PORT_BASE, PORT_SPAN = 20000, 20000


def master_port(job_id: str) -> int:
    """A port derived from the job id, so two jobs sharing a node do not collide."""
    return PORT_BASE + int(job_id) % PORT_SPAN


def first_node_address(nodelist: str) -> str:
    """NodeAddr of the first node of `nodelist` (via scontrol), falling back to its name."""
    hosts = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
    ).stdout.split()
    first = hosts[0]
    shown = subprocess.run(["scontrol", "show", "node", first], capture_output=True, text=True).stdout
    for field in shown.split():
        if field.startswith("NodeAddr="):
            return field.removeprefix("NodeAddr=")
    return first


def torch_env_from_slurm(
    environ: Mapping[str, str], resolve_address: Callable[[str], str] = first_node_address
) -> dict[str, str]:
    """RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT for one SLURM task."""
    job_id = environ.get("SLURM_ARRAY_JOB_ID") or environ["SLURM_JOB_ID"]
    if environ.get("SLURM_ARRAY_TASK_ID"):
        job_id = str(int(job_id) * 1000 + int(environ["SLURM_ARRAY_TASK_ID"]))
    tasks_per_node = environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0] or "1"
    return {
        "RANK": environ["SLURM_PROCID"],
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "WORLD_SIZE": environ["SLURM_NTASKS"],
        "LOCAL_WORLD_SIZE": tasks_per_node,
        "MASTER_ADDR": resolve_address(environ["SLURM_JOB_NODELIST"]),
        "MASTER_PORT": str(master_port(job_id)),
    }


def torch_env_from_submitit_local(environ: Mapping[str, str]) -> dict[str, str]:
    """The same variables for a task of submitit's local executor (all tasks on this machine)."""
    return {
        "RANK": environ["SUBMITIT_LOCAL_GLOBALID"],
        "LOCAL_RANK": environ["SUBMITIT_LOCAL_LOCALID"],
        "WORLD_SIZE": environ["SUBMITIT_LOCAL_NTASKS"],
        "LOCAL_WORLD_SIZE": environ["SUBMITIT_LOCAL_NTASKS"],
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(master_port(environ["SUBMITIT_LOCAL_JOB_ID"])),
    }


def adopt_launcher_environment() -> None:
    """In a task that no torch launcher started (srun, submitit), export the torch.distributed variables.

    Also caps intra-op threads at the CPUs SLURM gave the task, so tasks sharing a node do not
    oversubscribe it.
    """
    if "OMP_NUM_THREADS" not in os.environ and "SLURM_CPUS_PER_TASK" in os.environ:
        os.environ["OMP_NUM_THREADS"] = os.environ["SLURM_CPUS_PER_TASK"]
    if "RANK" in os.environ:
        return
    if "SUBMITIT_LOCAL_GLOBALID" in os.environ:
        os.environ.update(torch_env_from_submitit_local(os.environ))
    elif "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        os.environ.update(torch_env_from_slurm(os.environ))
