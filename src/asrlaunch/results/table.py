"""The model card's results table as text: rows from a merged run, the markdown the Trainer writes (byte for
byte), parsing a card's table back, the comparison with a reference card, and a sweep's summary. Pure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from asrlaunch.results.merge import MergedRun, RunResult

HEADERS = ("Training Loss", "Epoch", "Step", "Validation Loss", "Wer")
NO_LOG = "No log"


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


def sweep_summary(results: Sequence[RunResult]) -> str:
    """One row per sweep element, best final WER first: its overrides, final loss and WER, best WER and its
    step, restarts (elements without an evaluation last)."""
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
    rows.sort(key=lambda row: (row[2] == NO_LOG, row[2] if row[2] != NO_LOG else 0.0, row[0]))
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
