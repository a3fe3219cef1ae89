"""Per-rank logs of every attempt -> the model card's results table and its comparison. No torch.

Everything here is a pure function of records, except `read_run` and `run_result`, which read a run's
logs (and write nothing); `report.py` writes the results files. Merging: attempts are taken in order; an
attempt that resumed from step s replaces every record of the earlier attempts after s (the steps it
replayed), so the last attempt wins. The train loss of a step is the mean over the ranks that logged it;
evaluation comes from rank 0.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from asrlaunch.logs import is_start, read_run_logs
from asrlaunch.rundir import RunDir

HEADERS = ("Training Loss", "Epoch", "Step", "Validation Loss", "Wer")
NO_LOG = "No log"


class MixedRunsError(ValueError):
    """Logs of different runs were found in one run directory."""


@dataclass(frozen=True)
class MergedRun:
    train: dict[int, float]  # step -> training loss (mean over ranks)
    evals: dict[int, dict[str, float]]  # step -> eval_loss, wer
    steps_per_epoch: int
    meta: list[dict[str, Any]]  # the meta records kept, all ranks, all attempts
    restarts: list[int]  # the step each later attempt resumed from
    wall_time_s: float  # summed over attempts, first to last record of each (queue time excluded)
    device_seconds: float  # each attempt's wall time times its world size


# What a resume may change without making it another run: the job shape, how often it logs, evaluates and
# saves, when it stops, how it is distributed. Everything else in the recipe (model, data, optimisation, seed,
# run name) must agree between the logs of one run, so that two elements of a sweep are never merged.
MAY_CHANGE_ON_RESUME = (
    "cluster",
    "logging",
    "eval",
    "checkpoint",
    "data.cache_dir",
    "train.max_steps",
    "train.backend",
    "train.zero_stage",
    "train.max_micro_batch_size",
)


def _identity(meta: dict[str, Any]) -> dict[str, str]:
    """The recipe as dotted keys -> values, without what a resume may change."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if prefix in MAY_CHANGE_ON_RESUME:
            return
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), sub)
        else:
            flat[prefix] = repr(value)

    walk("", meta.get("recipe", {}))
    return flat


def check_one_run(metas: Sequence[dict[str, Any]]) -> None:
    """MixedRunsError naming the recipe keys in which the logs' start records disagree."""
    identities = [_identity(m) for m in metas]
    keys = sorted({k for ident in identities for k in ident})
    differ = [k for k in keys if len({ident.get(k) for ident in identities}) > 1]
    if differ:
        shown = ", ".join(differ[:6]) + (", ..." if len(differ) > 6 else "")
        raise MixedRunsError(
            f"logs of different runs are mixed in one folder (their recipes differ in {shown}): "
            "move each run's logs to its own run directory"
        )


def _number(value: Any) -> float:
    """A logged number; null stands for a non-finite value (the logs are strict JSON)."""
    return float("nan") if value is None else float(value)


def merge_records(records: Iterable[dict[str, Any]]) -> MergedRun:
    """Merge the records of all ranks and attempts of one run (see the module docstring)."""
    by_attempt: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_attempt[int(record.get("attempt", 0))].append(record)
    metas = [r for recs in by_attempt.values() for r in recs if is_start(r)]
    check_one_run(metas)
    losses: dict[int, dict[int, float]] = {}  # step -> rank -> loss
    evals: dict[int, dict[str, float]] = {}
    restarts = []
    wall = device = 0.0
    for attempt in sorted(by_attempt):
        recs = by_attempt[attempt]
        times = [float(r["time"]) for r in recs]
        wall += max(times) - min(times)
        world = max((r.get("world_size", 1) for r in recs if is_start(r)), default=1)
        device += world * (max(times) - min(times))
        starts = [r.get("resumed_from") or 0 for r in recs if is_start(r)]
        start = min(starts) if starts else min(r["step"] for r in recs) - 1
        if attempt != min(by_attempt):
            restarts.append(start)
        for table in (losses, evals):
            for step in [s for s in table if s > start]:
                del table[step]
        for record in recs:
            if record["kind"] == "train":
                losses.setdefault(record["step"], {})[record["rank"]] = _number(record["loss"])
            elif record["kind"] == "eval" and record["rank"] == 0:
                evals[record["step"]] = {
                    "eval_loss": _number(record["eval_loss"]),
                    "wer": _number(record["wer"]),
                }
    plans = [m["plan"]["steps_per_epoch"] for m in metas if "plan" in m]
    return MergedRun(
        train={step: sum(ranks.values()) / len(ranks) for step, ranks in sorted(losses.items())},
        evals=dict(sorted(evals.items())),
        steps_per_epoch=plans[-1] if plans else 1,
        meta=metas,
        restarts=restarts,
        wall_time_s=wall,
        device_seconds=device,
    )


def read_run(run_dir: str | Path | RunDir) -> MergedRun:
    """Read and merge every rank's log of a run; a rank the meta records promise but that has no log is
    warned of."""
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(Path(run_dir))
    logs = run.rank_logs()
    if not logs:
        raise FileNotFoundError(f"{run}: no rank logs in {run.logs} (is this a run directory?)")
    merged = merge_records(read_run_logs(run))
    expected = max((m.get("world_size", 1) for m in merged.meta), default=1)
    for rank in sorted(set(range(expected)) - set(logs)):
        warnings.warn(
            f"{run}: no log of rank {rank} ({run.rank_log(rank)}); its losses are left out", stacklevel=2
        )
    return merged


@dataclass(frozen=True)
class ResultRow:
    training_loss: float | str  # NO_LOG before the first logged training loss
    epoch: float
    step: int
    validation_loss: float
    wer: float

    def values(self) -> tuple[Any, ...]:
        return (self.training_loss, self.epoch, self.step, self.validation_loss, self.wer)


def result_rows(run: MergedRun) -> list[ResultRow]:
    """One row per evaluation; the training loss is the last one logged at or before that step."""
    rows = []
    for step, scores in run.evals.items():
        logged = [loss for s, loss in run.train.items() if s <= step]
        rows.append(
            ResultRow(
                round(logged[-1], 4) if logged else NO_LOG,
                round(step / run.steps_per_epoch, 2),
                step,
                scores["eval_loss"],
                scores["wer"],
            )
        )
    return rows


def format_value(value: Any, decimals: int = 4) -> str:
    """As the Trainer's card: floats with more than 4 decimals are rounded to 4, others kept as written."""
    text = str(value)
    if isinstance(value, float) and "." in text and len(text.split(".")[1]) > decimals:
        return f"{value:.{decimals}f}"
    return text


def render_table(rows: Sequence[Sequence[Any]], headers: Sequence[str] = HEADERS) -> str:
    """The model card's markdown table: centred columns, each padded to its widest cell plus one space."""
    cells = [[format_value(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "".join(f"| {v}" + " " * (w - len(v) + 1) for v, w in zip(values, widths, strict=True)) + "|\n"

    return line(headers) + "".join(f"|:{'-' * w}:" for w in widths) + "|\n" + "".join(line(r) for r in cells)


def parse_table(markdown: str) -> tuple[list[str], list[list[str]]]:
    """The results table of a model card -> headers and rows of cell text (exactly as written)."""
    lines = markdown.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith("|") and "Validation Loss" in ln), None)
    if start is None:
        raise ValueError("no results table (a row with 'Validation Loss') in the model card")
    block = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        block.append([cell.strip() for cell in ln.strip().strip("|").split("|")])
    return block[0], block[2:]


@dataclass(frozen=True)
class RunResult:
    """One run, merged: what every results file and the model card are written from."""

    run_dir: RunDir
    run: MergedRun
    rows: list[ResultRow]

    @property
    def name(self) -> str:
        return str(self.run.meta[-1]["recipe"]["run"]["name"])

    @property
    def final(self) -> ResultRow | None:
        return self.rows[-1] if self.rows else None

    @property
    def best(self) -> ResultRow | None:
        return min(self.rows, key=lambda r: r.wer) if self.rows else None

    def to_json(self) -> dict[str, Any]:
        return {
            "rows": [dict(zip(HEADERS, row.values(), strict=True)) for row in self.rows],
            "final": asdict(self.final) if self.final else None,
            "best_wer": self.best.wer if self.best else None,
            "best_step": self.best.step if self.best else None,
            "restarts": self.run.restarts,
        }


def run_result(run_dir: RunDir) -> RunResult:
    """Read and merge a run's logs into its results (ValueError when no rank logged its start)."""
    run = read_run(run_dir)
    if not run.meta:
        raise ValueError(f"{run_dir}: no rank logged its start (meta record); nothing to describe")
    return RunResult(run_dir, run, result_rows(run))


def sweep_summary(results: Sequence[RunResult]) -> str:
    """One row per sweep element: its overrides, final loss and WER, best WER and its step."""
    rows = []
    for result in results:
        final, best = result.final, result.best
        rows.append(
            (
                result.run_dir.path.name,
                final.validation_loss if final else NO_LOG,
                final.wer if final else NO_LOG,
                best.wer if best else NO_LOG,
                best.step if best else NO_LOG,
                len(result.run.restarts),
            )
        )
    return render_table(rows, ("Run", "Validation Loss", "Wer", "Best Wer", "Best Step", "Restarts"))


COMPARED = {"Training Loss": "train loss", "Epoch": "epoch", "Validation Loss": "val loss", "Wer": "WER"}


def _number_or_none(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):  # "No log", or a step missing on one side
        return None


def _compared(ref: Any, mine: Any) -> str:
    a, b = _number_or_none(ref), _number_or_none(mine)
    cells = [f"{x:>7.4f}" if x is not None else f"{'-':>7}" for x in (a, b)]
    cells.append(f"{b - a:>+7.4f}" if a is not None and b is not None else f"{'-':>7}")
    return " ".join(cells)


def compare_tables(reference: str, rows: Sequence[ResultRow]) -> str:
    """The reference card's table beside ours, step by step: every column as reference, ours, difference."""
    headers, ref_rows = parse_table(reference)
    ours = {row.step: dict(zip(HEADERS, row.values(), strict=True)) for row in rows}
    step_col = headers.index("Step")
    lines = [
        f"{'':>6} | " + " | ".join(f"{name:^23}" for name in COMPARED.values()),
        f"{'Step':>6} | " + " | ".join(f"{'ref':>7} {'ours':>7} {'diff':>7}" for _ in COMPARED),
    ]
    for ref in ref_rows:
        step = int(ref[step_col])
        mine = ours.get(step, {})
        cells = [_compared(ref[headers.index(header)], mine.get(header)) for header in COMPARED]
        lines.append(f"{step:>6} | " + " | ".join(cells))
    extra = sorted(set(ours) - {int(r[step_col]) for r in ref_rows})
    if extra:
        lines.append(f"steps only in this run: {', '.join(map(str, extra))}")
    return "\n".join(line.rstrip() for line in lines)
