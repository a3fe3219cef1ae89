"""The exit status of every `asrlaunch` command and of the training processes, defined once. No torch."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0  # done: the run trained to its end (or had finished already), the command did what was asked
    FAILED = 1  # it ran, and failed: training diverged, a requeue limit, a run that did not complete
    USAGE = 2  # the user's input is wrong (recipe, data, batch plan, arguments): one `error:` line each
    STOPPED = 3  # a signal stopped training after a checkpoint (requeued, or to continue with --resume)
    RESTART = 75  # failover, to the batch script: run the step again inside this allocation (EX_TEMPFAIL)
    INTERRUPTED = 130  # Ctrl-C
