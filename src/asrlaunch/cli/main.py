"""asrlaunch: one recipe in, SLURM jobs out. One command, one subcommand per task.

Each subcommand's module is imported only when it runs, so the launcher's commands (submit, status, collect)
never import torch and answer in about a second.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from asrlaunch.core import gc_policy
from asrlaunch.core.console import error
from asrlaunch.core.exits import ExitCode

# name -> (module with a main(argv) -> int, what it does)
COMMANDS: dict[str, tuple[str, str]] = {
    "submit": ("asrlaunch.cli.submit", "queue a recipe as SLURM jobs (--dry-run, --sweep, --resume, --wait)"),
    "status": (
        "asrlaunch.cli.status",
        "where runs are: SLURM state, progress, stops, errors (--watch, --json)",
    ),
    "collect": ("asrlaunch.cli.collect", "merge a run's logs: results table, model card, plots (--compare)"),
    "train": (
        "asrlaunch.engine.train",
        "one training process (alone, or under srun / torchrun -m asrlaunch)",
    ),
    "evaluate": ("asrlaunch.engine.evaluate", "a saved model on its recipe's test split"),
    "prepare": ("asrlaunch.data.prepare", "a recipe's corpus into the cache and its model into the HF cache"),
    "cache": ("asrlaunch.cli.cache", "what a corpus cache holds; remove what runs no longer read"),
    "synth": ("asrlaunch.data.synth", "generate a corpus (TIMIT, audiofolder or save_to_disk layout)"),
    "cluster": ("asrlaunch.cli.cluster", "the local SLURM cluster: install, start, stop, wipe, status"),
    "supervise": ("asrlaunch.job.supervisor", "(the batch script, beside srun) end a step whose ranks hang"),
    "failover": ("asrlaunch.job.failover", "(the batch script, after srun) restart, requeue or give up"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return (
        "usage: asrlaunch COMMAND [ARGS ...]   (asrlaunch COMMAND --help for its options)\n\n"
        + (__doc__ or "").split("\n")[0]
        + "\n\ncommands:\n"
        + "\n".join(lines)
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return ExitCode.OK if args else ExitCode.USAGE
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        error(f"unknown command {name!r}; the commands are: {', '.join(COMMANDS)}")
        return ExitCode.USAGE
    if COMMANDS[name][0].startswith("asrlaunch.engine."):
        gc_policy.defer_until_started()  # the torch processes: see core/gc_policy.py
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest))


if __name__ == "__main__":
    sys.exit(main())
