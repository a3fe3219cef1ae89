"""The code's shape, checked from the code itself: packages import one way (no circle, nothing importing back
up), only the engine imports torch, run-directory names live in rundir.py only, record kinds and events are
spelled in records.py only, and the results code runs one way (merge/table <- card <- report)."""

from __future__ import annotations

import ast
import io
import json
import re
import subprocess
import tokenize
from pathlib import Path

from asrlaunch.core.records import Event, Kind
from asrlaunch.core.rundir import RunDir, SweepDir

from .conftest import PYTHON, ROOT, python_env

PACKAGE = ROOT / "src" / "asrlaunch"
SOURCES = sorted([*PACKAGE.rglob("*.py"), *(ROOT / "launch").glob("*.py"), *(ROOT / "bench").glob("*.py")])
# What each part of the package may import at module level: each sees only the floors below it.
MAY_IMPORT = {
    "core": {"core"},
    "data": {"core", "data"},
    "results": {"core", "results"},
    "job": {"core", "job"},
    "launcher": {"core", "data", "results", "job", "launcher"},
    "engine": {"core", "data", "results", "job", "engine"},
    "cli": {"core", "data", "results", "job", "launcher", "engine", "cli"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def module_level_imports(path: Path) -> set[str]:
    """Our modules imported at module level (a function may import more when it runs: lazily, on purpose)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("asrlaunch"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                names.add(candidate if candidate in MODULES else node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("asrlaunch."))
    return names


def part(module: str) -> str:
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "top"


def test_every_module_belongs_to_a_part_and_imports_only_from_below() -> None:
    offences = []
    for module, path in MODULES.items():
        if module in ("asrlaunch", "asrlaunch.__main__"):
            continue
        allowed = MAY_IMPORT.get(part(module))
        assert allowed is not None, f"{module} is in no part of the package ({', '.join(MAY_IMPORT)})"
        for imported in module_level_imports(path):
            if part(imported) not in allowed:
                offences.append(f"{module} imports {imported}")
    assert not offences, "\n".join(offences)


def test_no_import_circle() -> None:
    graph = {m: {i for i in module_level_imports(p) if i in MODULES and i != m} for m, p in MODULES.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for nxt in sorted(graph[module]):
            assert state.get(nxt) != 1, "import circle: " + " -> ".join([*path, module, nxt])
            if nxt not in state:
                visit(nxt, [*path, module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_the_architecture_document_names_every_module_and_the_import_rules() -> None:
    """docs/architecture.md's table of packages: each row names exactly the package's modules and the parts
    MAY_IMPORT lets it import (the document and the rule this file enforces are one list)."""
    rows = {}
    for line in (ROOT / "docs" / "architecture.md").read_text().splitlines():
        found = re.match(r"\| `(\w+)/` \| (.*) \| (.*) \| (yes|no) \|$", line)
        if found:
            rows[found[1]] = (set(re.findall(r"`([a-z_]+)`", found[2])), set(re.findall(r"\w+", found[3])))
    assert set(rows) == set(MAY_IMPORT)
    for part, (named, may_import) in rows.items():
        modules = {m.rsplit(".", 1)[1] for m in MODULES if m.startswith(f"asrlaunch.{part}.")}
        assert named == modules, (part, sorted(named ^ modules))
        assert may_import & set(MAY_IMPORT) == MAY_IMPORT[part], part


def test_only_the_engine_imports_torch() -> None:
    """Import every module outside the engine, one after another, in one fresh interpreter: torch must not
    be loaded by any of them (the launcher's commands answer in about a second)."""
    outside = sorted(m for m in MODULES if part(m) != "engine" and m not in ("asrlaunch.__main__",))
    probe = (
        "import importlib, json, sys\n"
        f"for name in {outside!r}:\n"
        "    importlib.import_module(name)\n"
        "    if 'torch' in sys.modules:\n"
        "        print(json.dumps(name)); break\n"
        "else:\n"
        "    print(json.dumps(None))\n"
    )
    done = subprocess.run(
        [PYTHON, "-c", probe], capture_output=True, text=True, env=python_env(), timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) is None, f"{done.stdout.strip()} imports torch"
    assert len(outside) > 30


def strings(path: Path) -> list[tuple[int, str, str, str, str]]:
    """(line, text of a string literal that is not a docstring, token before, token after, the line)."""
    layout = (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT)
    source = path.read_text()
    lines = source.splitlines()
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type not in layout]
    found = []
    for i, token in enumerate(tokens):
        if token.type != tokenize.STRING or token.string.lstrip("rbfu").startswith(('"""', "'''")):
            continue
        before = tokens[i - 1].string if i else ""
        after = tokens[i + 1].string if i + 1 < len(tokens) else ""
        found.append((token.start[0], token.string, before, after, lines[token.start[0] - 1]))
    return found


def literal(text: str) -> str:
    return text.lstrip("rbfu")[1:-1]


def test_record_kinds_and_events_are_spelled_in_records_only() -> None:
    events, kinds = {e.value for e in Event}, {k.value for k in Kind}
    offences = []
    for path in SOURCES:
        if path.name == "records.py":
            continue
        for line, text, _, _, source_line in strings(path):
            value = literal(text)
            # Where a line speaks of an event or a record kind, a string equal to one is one spelled again.
            # (Elsewhere `error`, `checkpoint`, `train` are also field, fault and recipe-section names.)
            if value in events | kinds and ("event" in source_line or "kind" in source_line):
                offences.append(f"{path.relative_to(ROOT)}:{line}: {text}")
    assert not offences, "\n".join(offences)


def test_the_log_format_document_is_generated_from_the_schema() -> None:
    from asrlaunch.core.records import markdown

    document = (ROOT / "docs" / "log-format.md").read_text()
    assert markdown() in document, "docs/log-format.md is stale: python -m asrlaunch.core.records"


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


def test_run_directory_names_are_written_only_in_rundir() -> None:
    offences = []
    for path in SOURCES:
        if path.name == "rundir.py":
            continue
        for line, text, before, after, _ in strings(path):
            value = literal(text)
            named_file = any(name in value for name in FILE_NAMES) or "rank{" in value
            path_part = value in FOLDER_NAMES and "/" in (before, after)
            if named_file or path_part:
                offences.append(f"{path.relative_to(ROOT)}:{line}: {text}")
    assert not offences, "\n".join(offences)


def test_results_code_runs_one_way() -> None:
    results = {
        name: module_level_imports(MODULES[f"asrlaunch.results.{name}"])
        for name in ("merge", "table", "card", "report")
    }
    later = {"asrlaunch.results.card", "asrlaunch.results.report"}
    assert not (results["merge"] | results["table"]) & later
    assert "asrlaunch.results.report" not in results["card"]
    assert {"asrlaunch.results.merge", "asrlaunch.results.card"} <= results["report"]
