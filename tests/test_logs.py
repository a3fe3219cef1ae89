from __future__ import annotations

from pathlib import Path

import pytest

from asrlaunch.core.logs import RankLog, read_records, read_run_logs
from asrlaunch.core.records import Event, Kind


def test_records_carry_the_common_fields(tmp_path: Path) -> None:
    with RankLog(tmp_path, rank=1, attempt=2) as log:
        log.write(Kind.TRAIN, 10, 0.0689, loss=3.2)
    (record,) = read_records(tmp_path / "logs" / "rank1.jsonl")
    assert record["kind"] == "train" and record["step"] == 10 and record["rank"] == 1
    assert record["attempt"] == 2 and record["epoch"] == 0.0689 and record["loss"] == 3.2
    assert isinstance(record["time"], float)


def test_non_finite_numbers_are_written_as_null(tmp_path: Path) -> None:
    """Strict JSON lines (no NaN/Infinity tokens); the collector reads null back as NaN."""
    import json
    import math

    from asrlaunch.results.merge import merge_records

    with RankLog(tmp_path, 0, attempt=0) as log:
        log.write(Kind.TRAIN, 1, 0.1, loss=float("nan"), grad_norm=float("inf"), lr=1e-4)
    line = (tmp_path / "logs" / "rank0.jsonl").read_text()
    record = json.loads(line, parse_constant=lambda token: pytest.fail(f"{token} in {line}"))
    assert record["loss"] is None and record["grad_norm"] is None and record["lr"] == 1e-4
    assert math.isnan(merge_records([record]).train[1])


def test_unknown_kind_is_refused(tmp_path: Path) -> None:
    with (
        RankLog(tmp_path, 0, attempt=0) as log,
        pytest.raises(ValueError, match="not one of meta, train, eval"),
    ):
        log.write("debug", 1, 0.0)  # type: ignore[arg-type]


def test_a_field_the_schema_does_not_define_is_refused(tmp_path: Path) -> None:
    with RankLog(tmp_path, 0, attempt=0) as log:
        with pytest.raises(ValueError, match="a train record has no field losss"):
            log.write(Kind.TRAIN, 1, 0.0, losss=1.0)
        with pytest.raises(ValueError, match="a meta failure record has no field requeud"):
            log.event(Event.FAILURE, 1, 0.0, requeud=True)
        log.event(Event.FAILURE, 1, 0.0, requeued=True)
    assert [r["event"] for r in read_records(tmp_path / "logs" / "rank0.jsonl")] == ["failure"]


def test_a_torn_last_line_is_skipped_with_a_warning(tmp_path: Path) -> None:
    with RankLog(tmp_path, 0, attempt=0) as log:
        log.write(Kind.TRAIN, 1, 0.1, loss=1.0)
        log.write(Kind.TRAIN, 2, 0.2, loss=0.9)
    path = tmp_path / "logs" / "rank0.jsonl"
    path.write_text(path.read_text() + '{"kind": "train", "st')
    with pytest.warns(UserWarning, match="truncated last line"):
        records = list(read_records(path))
    assert [r["step"] for r in records] == [1, 2]


def test_a_torn_line_then_a_new_attempt_keeps_every_whole_record(tmp_path: Path) -> None:
    with RankLog(tmp_path, 0, attempt=0) as log:
        log.write(Kind.TRAIN, 1, 0.1, loss=1.0)
    path = tmp_path / "logs" / "rank0.jsonl"
    path.write_text(path.read_text() + '{"kind": "train", "st')  # killed mid-line
    with RankLog(tmp_path, 0, attempt=1) as log:  # the next attempt appends
        log.start(1, 0.1, resumed_from=1)
    with pytest.warns(UserWarning, match=r"rank0.jsonl:2: skipping a truncated line"):
        records = list(read_records(path))
    assert [(r["kind"], r["attempt"]) for r in records] == [("train", 0), ("meta", 1)]


def test_run_logs_gather_all_ranks(tmp_path: Path) -> None:
    for rank in (0, 1):
        with RankLog(tmp_path, rank, attempt=0) as log:
            log.start(0, 0.0, world_size=2)
    assert sorted(r["rank"] for r in read_run_logs(tmp_path)) == [0, 1]
