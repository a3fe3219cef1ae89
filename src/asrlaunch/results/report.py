"""Every results file of a run and of a sweep, written from merged results. Launcher side: no torch.

run:   results.md (the card's table, byte for byte), results.csv, results.json, curves.png, and the model card
       final/README.md (its only writer; the final save leaves it in place)
sweep: summary.md (one row per element) and curves.png (every element in one plot)
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path

from asrlaunch.core.rundir import SweepDir, write_text_atomic
from asrlaunch.results.card import model_card
from asrlaunch.results.merge import MergedRun, RunResult
from asrlaunch.results.table import HEADERS, render_table, sweep_summary


def results_csv(result: RunResult) -> str:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\r\n")
    writer.writerow(HEADERS)
    writer.writerows(row.values() for row in result.rows)
    return text.getvalue()


def write_run_report(result: RunResult) -> list[Path]:
    """Write the run's results files and model card; returns their paths."""
    run_dir = result.run_dir
    write_text_atomic(run_dir.results_md, render_table([r.values() for r in result.rows]))
    write_text_atomic(run_dir.results_csv, results_csv(result))
    write_text_atomic(run_dir.results_json, json.dumps(result.to_json(), indent=1) + "\n")
    plot_curves(run_dir.curves, {run_dir.path.name: result.run})
    run_dir.final.mkdir(exist_ok=True)
    write_text_atomic(run_dir.card, model_card(result))
    return [run_dir.results_md, run_dir.results_csv, run_dir.results_json, run_dir.curves, run_dir.card]


def write_sweep_report(sweep: SweepDir, results: Sequence[RunResult]) -> list[Path]:
    write_text_atomic(sweep.summary, sweep_summary(results))
    plot_curves(sweep.curves, {r.run_dir.path.name: r.run for r in results})
    return [sweep.summary, sweep.curves]


def plot_curves(path: Path, runs: dict[str, MergedRun]) -> None:
    """Training loss, validation loss and WER against step; dotted lines where an attempt resumed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, wer_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for label, run in runs.items():
        prefix = f"{label}: " if len(runs) > 1 else ""
        loss_axis.plot(list(run.train), list(run.train.values()), label=f"{prefix}training loss")
        loss_axis.plot(
            list(run.evals),
            [e["eval_loss"] for e in run.evals.values()],
            "o-",
            markersize=3,
            label=f"{prefix}validation loss",
        )
        wer_axis.plot(
            list(run.evals), [e["wer"] for e in run.evals.values()], "o-", markersize=3, label=f"{prefix}WER"
        )
        for step in run.restarts:
            for axis in (loss_axis, wer_axis):
                axis.axvline(step, color="grey", linestyle=":", linewidth=1)
    if any(run.restarts for run in runs.values()):
        wer_axis.plot([], [], color="grey", linestyle=":", label="restart (resumed here)")
    loss_axis.set(xlabel="step", ylabel="loss", yscale="log", title="loss")
    wer_axis.set(xlabel="step", ylabel="WER", title="word error rate")
    for axis in (loss_axis, wer_axis):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    partial = path.with_name(f".{path.name}.partial.png")
    figure.savefig(partial, dpi=110)
    plt.close(figure)
    partial.replace(path)
