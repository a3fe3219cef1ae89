"""asrlaunch cluster install|start|stop|wipe|status|dbd-stop|dbd-start|preempt-mode user|term

The local SLURM cluster of a checkout (slurm/cluster.sh: 3 nodes x 2 CPUs x 2 fake GPUs on this machine), for
development, tests and the demo. A real cluster needs none of this.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from asrlaunch.core.console import error
from asrlaunch.core.exits import ExitCode

SCRIPT = Path(__file__).resolve().parents[3] / "slurm" / "cluster.sh"


def task_pid(job_id: str, rank: int) -> int:
    """The process of `rank`'s task of a job on the local cluster (all its nodes are this host): the one the
    tests and the soak stop or kill."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            command = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if (
            f"SLURM_JOB_ID={job_id}".encode() in environ
            and f"SLURM_PROCID={rank}".encode() in environ
            and b"submitit.core._submit" in command
            and not command.startswith(b"srun")  # srun's own command line names the module too
        ):
            return int(proc.name)
    raise LookupError(f"no task of rank {rank} of job {job_id} found")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return ExitCode.OK if args else ExitCode.USAGE
    if not SCRIPT.exists():
        error(
            f"{SCRIPT} is not here: the local cluster comes with a checkout of asrlaunch (pip install -e .)"
        )
        return ExitCode.USAGE
    return subprocess.run(["bash", str(SCRIPT), *args]).returncode
