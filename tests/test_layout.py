"""The code's shape: run-directory names live in rundir.py only; the launcher side never imports the worker
side; the results code runs one way (collect <- card <- report)."""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

from asrlaunch.rundir import RunDir, SweepDir

from .conftest import ROOT

SOURCES = sorted([*(ROOT / "src" / "asrlaunch").rglob("*.py"), *(ROOT / "launch").glob("*.py")])
RUN = RunDir(Path("run"))
FILE_NAMES = {
    path.name
    for path in (
        RUN.recipe,
        RUN.plan,
        RUN.job,
        RUN.finished_marker,
        RUN.results_md,
        RUN.results_csv,
        RUN.results_json,
        RUN.curves,
        SweepDir(Path("sweep")).summary,
    )
}
FOLDER_NAMES = {RUN.logs.name, RUN.checkpoints.name, RUN.final.name, RUN.submitit.name, RUN.tracking.name}
LAUNCHER_SIDE = [
    "recipe",
    "plan",
    "rundir",
    "sweep",
    "cluster",
    "scheduler",
    "status",
    "collect",
    "card",
    "report",
    "logs",
    "distenv",
    "signals",
    "job",
    "cli",
    "state",
    "metrics",
    "checkpoint",
    "progress",
]
WORKER_SIDE = {"train", "runtime", "model", "evaluate", "data.batches", "data.timit"}


def strings(path: Path) -> list[tuple[int, str, str, str]]:
    """(line, text of a string literal that is not a docstring, token before, token after)."""
    layout = (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT)
    source = io.StringIO(path.read_text()).readline
    tokens = [t for t in tokenize.generate_tokens(source) if t.type not in layout]
    found = []
    for i, token in enumerate(tokens):
        if token.type != tokenize.STRING or token.string.lstrip("rbfu").startswith(('"""', "'''")):
            continue
        before = tokens[i - 1].string if i else ""
        after = tokens[i + 1].string if i + 1 < len(tokens) else ""
        found.append((token.start[0], token.string, before, after))
    return found


def test_run_directory_names_are_written_only_in_rundir() -> None:
    offences = []
    for path in SOURCES:
        if path.name == "rundir.py":
            continue
        for line, text, before, after in strings(path):
            literal = text.lstrip("rbfu")[1:-1]
            named_file = any(name in literal for name in FILE_NAMES) or "rank{" in literal
            path_part = literal in FOLDER_NAMES and "/" in (before, after)
            if named_file or path_part:
                offences.append(f"{path.relative_to(ROOT)}:{line}: {text}")
    assert not offences, "\n".join(offences)


def imported_modules(path: Path) -> set[str]:
    """Modules of ours imported at module level (a function may import the worker side when a job runs)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("asrlaunch."):
            names.add(node.module.removeprefix("asrlaunch."))
        elif isinstance(node, ast.ImportFrom) and node.module == "asrlaunch":
            names.update(alias.name for alias in node.names)
    return names


def test_launcher_side_imports_no_worker_module() -> None:
    package = ROOT / "src" / "asrlaunch"
    for name in LAUNCHER_SIDE:
        imported = imported_modules(package / f"{name}.py")
        assert not imported & WORKER_SIDE, f"{name}.py imports {imported & WORKER_SIDE}"


def test_results_code_runs_one_way() -> None:
    package = ROOT / "src" / "asrlaunch"
    assert not imported_modules(package / "collect.py") & {"card", "report"}
    assert not imported_modules(package / "card.py") & {"report"}
    assert {"collect", "card"} <= imported_modules(package / "report.py")
