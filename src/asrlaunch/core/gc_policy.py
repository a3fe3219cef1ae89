"""Python's cyclic garbage collector in a process that imports torch and transformers (train, evaluate).

Those imports leave ~400k long-lived objects (functions, classes, annotations) that every full collection
walks again, ~0.25 s each on a 2-core machine: several while the process starts, and one more when the
interpreter exits (1.1 s of a one-step run's 5 s, in every rank, restart and evaluation). So: no collection
while the process starts; one when it has started, which frees what start-up left in cycles and moves what
lives on out of later collections (`gc.freeze`); none of those objects again at exit. Reference counting
frees everything else as before: only cyclic garbage waits, and only during start-up.
"""

from __future__ import annotations

import atexit
import gc


def defer_until_started() -> None:
    """First thing in the process, before its heavy imports."""
    gc.disable()
    # Registered before any tracker or logger registers its own, so it runs after all of them.
    atexit.register(gc.freeze)


def started() -> None:
    """Start-up is over (model built, data open): collect once, freeze the survivors, collect as usual."""
    gc.collect()
    gc.freeze()
    gc.enable()
