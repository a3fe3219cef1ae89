"""Quiet, useful job logs: our progress lines, warnings and errors in a job's output, one line each; the
libraries' own output (their logging, warnings and progress bars) in `logs/debug-rank<R>.log` instead, or in
both with `logging.verbose: true`."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import unittest.mock
import warnings
from pathlib import Path
from typing import Any, TextIO

from asrlaunch.core.rundir import RunDir
from asrlaunch.data.corpus import save_processor
from asrlaunch.engine.checkpoint import flush_tree

OURS = str(Path(__file__).resolve().parents[1])  # warnings raised from our own code stay on the console
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def route_library_output(run_dir: RunDir, rank: int, verbose: bool) -> None:
    """Send the libraries' logging and warnings to this rank's debug log; keep ours on the console."""
    path = run_dir.debug_log(rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    console = warnings.showwarning

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        if verbose or filename.startswith(OURS):
            console(message, category, filename, lineno, file, line)
        if not filename.startswith(OURS):
            logging.getLogger("py.warnings").warning(
                "%s:%s: %s: %s", filename, lineno, category.__name__, message
            )

    warnings.showwarning = show
    if verbose:
        return
    import transformers

    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read when datasets is first imported


def adopt_logger(name: str, verbose: bool) -> None:
    """A library logger that writes to the console itself (DeepSpeed's): to the debug log instead."""
    logger = logging.getLogger(name)
    if verbose:
        return
    for handler in list(logger.handlers):
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            logger.removeHandler(handler)
    logger.propagate = True


def save_bare(model: Any, folder: Path) -> None:
    """`save_pretrained` of a model no wrapper holds. transformers unwraps it through accelerate, which
    imports DeepSpeed whenever it is installed (seconds, and its accelerator warning in the job's output) only
    to recognise an engine this model cannot be."""
    import accelerate.utils.other

    known = sys.modules.get("deepspeed") is not None
    patch = (
        contextlib.nullcontext()
        if known
        else unittest.mock.patch.object(accelerate.utils.other, "is_deepspeed_available", lambda: False)
    )
    with patch:
        model.save_pretrained(folder, safe_serialization=True)


def save_final_model(model: Any, processor: Any, run_dir: RunDir, total_steps: int) -> None:
    """save_pretrained model + processor, written aside, then moved into final/ (beside a model card the
    collector may have written there), the finished marker last."""
    final, partial = run_dir.final, run_dir.final_partial
    shutil.rmtree(partial, ignore_errors=True)
    save_bare(model, partial)
    save_processor(processor, partial)
    final.mkdir(exist_ok=True)
    for path in partial.iterdir():
        os.replace(path, final / path.name)
    partial.rmdir()
    flush_tree(final)  # the model on disk before the marker that says the run finished
    run_dir.mark_finished(total_steps)
