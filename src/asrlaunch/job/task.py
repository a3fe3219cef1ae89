"""What one SLURM task knows about itself, and every question it asks the scheduler: one object, as submitit's
`JobEnvironment`. No torch.

`SlurmTask.from_environ()` reads the job and array ids, the restart count, the node and the task's place in
the step from SLURM's variables; its methods make every `scontrol`/`squeue` call of the worker side (the
trainer's stop decision, failover and the supervisor in the batch script): the job's state, whether it was
preempted, the time left, requeue, node exclusion. Outside SLURM (`job_id` None) they answer without a call.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from asrlaunch.core.records import Event
from asrlaunch.job.scheduler import (
    HELD_STATE,
    SIGNAL_RESOLUTION_S,
    USER_HOLD,
    parse_scontrol_jobs,
    parse_time_left,
    run_command,
)

# Below Linux's ephemeral ports (32768-60999 by default), which any outgoing connection of a busy node may
# hold (another job's NCCL): a master port among them fails now and then with EADDRINUSE.
PORT_BASE, PORT_SPAN = 15000, 17000
# `--signal` may come up to SIGNAL_RESOLUTION_S before its delay, and a stop is judged after the step that
# noticed it: within this much more than the delay, a USR2 is the time limit's warning.
SIGNAL_EARLY_S = SIGNAL_RESOLUTION_S + 30


def master_port(job_id: str) -> int:
    """A port derived from the job id, so two jobs sharing a node do not collide."""
    return PORT_BASE + int(job_id) % PORT_SPAN


def within_requeue_budget(requeues: int, max_requeues: int) -> bool:
    """The one rule of the requeue budget: a job may have been requeued at most `cluster.max_requeues`
    times. A start checks the requeues it has had; a stop checks them plus the one it is about to ask for."""
    return requeues <= max_requeues


@dataclass(frozen=True)
class SlurmTask:
    job_id: str | None = None
    array_job_id: str | None = None
    array_task_id: str | None = None
    restart_count: int = 0  # SLURM_RESTART_COUNT: unset on a job's first run, then 1, 2, 3 after requeues
    node: str | None = None  # SLURMD_NODENAME: SLURM's name of this task's node
    nodelist: str | None = None
    proc_id: int = 0
    ntasks: int = 1
    local_id: int = 0
    tasks_per_node: int = 1
    nodes: int = 1
    master_addr: str | None = None  # MASTER_ADDR_VARIABLE: resolved once by the batch script for all tasks

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> SlurmTask:
        env = os.environ if environ is None else environ
        return cls(
            job_id=env.get("SLURM_JOB_ID") or None,
            array_job_id=env.get("SLURM_ARRAY_JOB_ID") or None,
            array_task_id=env.get("SLURM_ARRAY_TASK_ID") or None,
            restart_count=int(env.get("SLURM_RESTART_COUNT", "0") or 0),
            node=env.get("SLURMD_NODENAME") or None,
            nodelist=env.get("SLURM_JOB_NODELIST") or None,
            proc_id=int(env.get("SLURM_PROCID", "0") or 0),
            ntasks=int(env.get("SLURM_NTASKS", "1") or 1),
            local_id=int(env.get("SLURM_LOCALID", "0") or 0),
            tasks_per_node=int((env.get("SLURM_NTASKS_PER_NODE", "") or "1").split("(")[0] or 1),
            nodes=int(env.get("SLURM_JOB_NUM_NODES", "1") or 1),
            master_addr=env.get(MASTER_ADDR_VARIABLE) or None,
        )

    @property
    def in_slurm(self) -> bool:
        return self.job_id is not None

    @property
    def target(self) -> str:
        """The id scontrol and squeue know this job (or this element of a job array) by."""
        if self.array_job_id and self.array_task_id:
            return f"{self.array_job_id}_{self.array_task_id}"
        return self.job_id or ""

    @property
    def array_index(self) -> int:
        return int(self.array_task_id or 0)

    def placement(self) -> dict[str, Any]:
        """Where this task runs, as a rank's start record names it (its local rank and GPUs as the launcher
        set them: torchrun's LOCAL_RANK, SLURM's or the site's CUDA_VISIBLE_DEVICES)."""
        return {
            "job_id": self.job_id,
            "slurm_restart_count": self.restart_count,
            "nodes": self.nodes,
            "host": os.uname().nodename,
            "node": self.node,
            "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }

    def node_name(self) -> str:
        """This task's node: SLURM's name for it, torchrun's node rank, or the host's name."""
        group = os.environ.get("GROUP_RANK")
        return self.node or (f"group{group}" if group else os.uname().nodename)

    def within_requeue_budget(self, max_requeues: int, another: bool = False) -> bool:
        """Requeues so far (and `another`, about to be asked for) within `cluster.max_requeues`."""
        return within_requeue_budget(self.restart_count + int(another), max_requeues)

    # -- what the scheduler says about this job -------------------------------------------------------------
    def show(self, tries: int = 1, timeout_s: float = 15.0) -> dict[str, str]:
        """`scontrol show job` of this job, as fields ({} outside SLURM, or when the controller is silent:
        asked up to `tries` times)."""
        if not self.job_id:
            return {}
        shown = self._ask(["scontrol", "show", "job", self.job_id], tries, 2.0, timeout_s)
        return next(iter(parse_scontrol_jobs(shown or "").values()), {})

    @staticmethod
    def _ask(command: list[str], tries: int, pause_s: float, timeout_s: float = 15.0) -> str | None:
        """A scheduler command's output, asked again when it fails (a busy controller), or None."""
        for turn in range(tries):
            shown = run_command(command, timeout_s)
            if shown is not None:
                return shown
            if turn + 1 < tries:
                time.sleep(pause_s)
        return None

    def state(self) -> str:
        """This job's state now (a user's scancel shows as CANCELLED)."""
        return self.show().get("JobState", "")

    def preempted(self) -> bool:
        """SLURM marks a job it preempts (PreemptTime) before the grace time's SIGTERM reaches it. Asked again
        when the controller is silent (it is busiest when it preempts many jobs at once): a preemption taken
        for a user's stop is not requeued. Three tries of at most 8 s: the grace time is running."""
        return self.show(tries=3, timeout_s=8.0).get("PreemptTime", "None") not in ("None", "Unknown", "")

    def time_left(self) -> float | None:
        if not self.job_id:
            return None
        shown = run_command(["squeue", "-h", "-j", self.job_id, "-o", "%L"])
        return parse_time_left(shown.splitlines()[0] if shown and shown.strip() else "")

    def stop_kind(self, signum: int | None, signal_delay_s: int) -> Event:
        """What a stop signal means. SIGTERM: a preemption when SLURM marked the job preempted (a job that
        ends inside its grace time is not requeued by SLURM, so we requeue it as after USR2); otherwise a lost
        node or the user's signal: `terminated`, never requeued by us (SLURM requeues a lost node's job; a
        user's stays stopped for `--resume`). USR2: a timeout within the signal delay of the time limit, else
        a preemption (`preempt_send_user_signal`); outside SLURM a `signal`."""
        if signum == signal.SIGTERM:
            return Event.PREEMPTION if self.preempted() else Event.TERMINATED
        if not self.job_id:
            return Event.SIGNAL
        left = self.time_left()
        return (
            Event.TIMEOUT
            if left is not None and left <= signal_delay_s + SIGNAL_EARLY_S
            else Event.PREEMPTION
        )

    # -- what this task asks of the scheduler -------------------------------------------------------------
    def requeue(self) -> bool:
        """`scontrol requeue` this job (or array element); False outside SLURM or when refused."""
        return self._scontrol("requeue", self.target)

    def requeue_without(self, nodes: Sequence[str]) -> tuple[bool, bool]:
        """Requeue this job, kept off `nodes` from its next start on (added to those it already excludes).
        SLURM changes the node exclusions of pending jobs only: the job is requeued held, updated, released.
        Returns (requeued, excluded)."""
        if not nodes:
            return self.requeue(), False
        known = self.show().get("ExcNodeList", "(null)")  # a hostlist (`node[3-4]`), which SLURM takes back
        excluded = sorted({*nodes, *([known] if known not in ("(null)", "") else [])})
        if not self._scontrol("requeuehold", self.target):
            return self.requeue(), False
        # requeuehold ends the batch step: SIGKILL follows after KillWait (30 s by default). The update and
        # the release must be done by then, or the job stays held (`status` says so).
        updated = self._scontrol(
            "update", f"JobId={self.target}", f"ExcNodeList={','.join(excluded)}", timeout_s=10
        )
        released = self._scontrol("release", self.target, timeout_s=8) or self._scontrol(
            "release", self.target, timeout_s=8
        )
        return released or not self._still_held(), updated

    def _still_held(self) -> bool:
        """After a release that timed out (which the controller may have done all the same); unknown: held."""
        shown = self.show()
        return not shown or shown.get("JobState") == HELD_STATE or shown.get("Reason") == USER_HOLD

    def _scontrol(self, *args: str, timeout_s: float = 60) -> bool:
        if not self.job_id:
            return False
        return run_command(["scontrol", *args], timeout_s=timeout_s) is not None

    def cancel_step(self, step: str, signal_name: str = "KILL") -> bool:
        """Send a signal to every task of one job step (`JOB.STEP`), on whatever node it runs; False when
        scancel refused or a busy controller did not answer in time (the caller goes on)."""
        command = ["scancel", f"--signal={signal_name}", f"{self.job_id}.{step}"]
        return run_command(command, timeout_s=60) is not None

    def running_steps(self, tries: int = 4, pause_s: float = 5.0) -> list[str]:
        """The ids of this job's job steps that run now (srun's; not the batch or extern step). squeue is
        asked again when it fails (a busy controller), so that a hang found is not left running."""
        command = ["squeue", "-h", "-s", "-j", self.job_id or "", "-o", "%i"]
        shown = self._ask(command, tries, pause_s) if self.in_slurm else None
        steps = [line.strip().rsplit(".", 1)[-1] for line in (shown or "").splitlines() if "." in line]
        return [step for step in steps if step.isdigit()]

    # -- torch.distributed from SLURM's variables ---------------------------------------------------------
    def torch_environment(self, resolve_address: Callable[[str], str] | None = None) -> dict[str, str]:
        """RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT of this task. The master
        address is the first node's NodeAddr, because node names need not resolve (here they do not): the
        batch script's, when it resolved it (two scontrol calls per step, not two per task)."""
        resolve = resolve_address or first_node_address
        port_key = self.job_id or "0"  # each element of a job array has a SLURM_JOB_ID of its own
        return {
            "RANK": str(self.proc_id),
            "LOCAL_RANK": str(self.local_id),
            "WORLD_SIZE": str(self.ntasks),
            "LOCAL_WORLD_SIZE": str(self.tasks_per_node),
            "MASTER_ADDR": self.master_addr or resolve(self.nodelist or ""),
            "MASTER_PORT": str(master_port(port_key)),
        }


MASTER_ADDR_VARIABLE = "ASRLAUNCH_MASTER_ADDR"


def master_address_line(python: str) -> str:
    """The batch script's line that resolves the first node's address once per step, for all its tasks
    (empty, so that each task asks itself, unless scontrol answered both questions)."""
    resolve = (
        "import os; from asrlaunch.job.task import known_first_node_address as first; "
        "print(first(os.environ['SLURM_JOB_NODELIST']) or '')"
    )
    return f'export {MASTER_ADDR_VARIABLE}="$({python} -c "{resolve}")"'


def known_first_node_address(nodelist: str) -> str | None:
    """The first node's NodeAddr, only when scontrol gave both the node and its address."""
    nodes = (run_command(["scontrol", "show", "hostnames", nodelist]) or "").split()
    return known_node_address(nodes[0]) if nodes else None


def known_node_address(node: str) -> str | None:
    for item in (run_command(["scontrol", "show", "node", node]) or "").split():
        if item.startswith("NodeAddr="):
            return item.removeprefix("NodeAddr=")
    return None


def hostnames(nodelist: str) -> list[str]:
    """`node[1-3]` -> node1, node2, node3 (scontrol's expansion)."""
    shown = run_command(["scontrol", "show", "hostnames", nodelist])
    return shown.split() if shown else [nodelist]


def first_node_address(nodelist: str) -> str:
    """The first node's NodeAddr, or what is known of it when scontrol does not say (its name)."""
    first = hostnames(nodelist)[0]
    return known_node_address(first) or first


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


def task_rank(environ: Mapping[str, str] | None = None) -> int:
    """This task's global rank from its launcher's variables alone (torchrun's, submitit's local executor's,
    SLURM's): before `adopt_launcher_environment`, which may wait on the controller."""
    env = os.environ if environ is None else environ
    for key in ("RANK", "SUBMITIT_LOCAL_GLOBALID", "SLURM_PROCID"):
        if env.get(key, "").isdigit():
            return int(env[key])
    return 0


def adopt_launcher_environment() -> None:
    """In a task that no torch launcher started (srun, submitit), export the torch.distributed variables, and
    cap intra-op threads at the CPUs SLURM gave the task, so tasks sharing a node do not oversubscribe it."""
    if "OMP_NUM_THREADS" not in os.environ and "SLURM_CPUS_PER_TASK" in os.environ:
        os.environ["OMP_NUM_THREADS"] = os.environ["SLURM_CPUS_PER_TASK"]
    if "RANK" in os.environ:
        return
    if "SUBMITIT_LOCAL_GLOBALID" in os.environ:
        os.environ.update(torch_env_from_submitit_local(os.environ))
        return
    task = SlurmTask.from_environ()
    if task.in_slurm and task.ntasks > 1:
        os.environ.update(task.torch_environment())
