"""The corpus cache over time: builds killed or failing midway, what `asrlaunch cache` lists, and the
removal of what no run reads any more."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from asrlaunch.data.building import LOCK, MIN_ABANDONED_AGE_S, PARTIAL, REMOVING, building
from asrlaunch.data.cache import TABLE_FILE

from .conftest import PYTHON, RECIPES, python_env


def stop_mid_build(process: subprocess.Popen[bytes], cache: Path) -> Path:
    """Stop `process` (SIGSTOP, waited for) while it holds a partial folder's lock, the build of either split;
    that folder."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if any(cache.glob(f"*{PARTIAL}*/{LOCK}")):
            os.kill(process.pid, signal.SIGSTOP)
            os.waitpid(process.pid, os.WUNTRACED)
            building = [lock.parent for lock in cache.glob(f"*{PARTIAL}*/{LOCK}")]
            if building:
                return building[0]
            os.kill(process.pid, signal.SIGCONT)  # it renamed that one as we looked: the next split's
        time.sleep(0.002)
    process.kill()
    raise AssertionError(f"no partial table seen in {cache} before the preparation ended")


def test_a_build_killed_midway_is_removed_by_the_next_preparation_on_its_host(
    tones_corpus: Path, tmp_path: Path
) -> None:
    """kill -9 during a preparation leaves a corpus-sized partial folder; the next preparation on the same
    host removes it (the lock its builder held died with it) and keeps a live build's (its lock held), a
    folder younger than a minute (maybe not locked yet), another host's, and a host `<ours>-2`'s."""
    cache = tmp_path / "cache"
    command = [PYTHON, "-m", "asrlaunch", "prepare", str(RECIPES / "smoke.yaml")]
    command += [f"data.dir={tones_corpus}", f"data.cache_dir={cache}"]
    env = python_env(OMP_NUM_THREADS="2")
    killed = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    abandoned = stop_mid_build(killed, cache)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert (abandoned / LOCK).exists()
    ours = f"{PARTIAL}{socket.gethostname()}"
    kept = {
        "live": cache / f"train-0{ours}-1",
        "young": cache / f"train-1{ours}-2",
        "another host": cache / f"train-2{PARTIAL}another-3",
        "host <ours>-2": cache / f"train-3{ours}-2-4",
    }
    for folder in kept.values():
        folder.mkdir()
        (folder / LOCK).touch()
    past = time.time() - MIN_ABANDONED_AGE_S - 1
    for folder in [abandoned, *(kept[name] for name in ("live", "another host", "host <ours>-2"))]:
        os.utime(folder, (past, past))
    with open(kept["live"] / LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a builder that still runs
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"corpus: removed {abandoned}, a build on this host whose process ended first" in done.stdout
    assert not abandoned.exists()
    assert [name for name, folder in kept.items() if not folder.exists()] == []
    assert len(list(cache.glob("*-*/table.arrow"))) == 2  # both splits prepared


def test_a_build_that_raises_leaves_nothing_and_one_that_ends_leaves_only_its_table(tmp_path: Path) -> None:
    entry = tmp_path / "train-0123"
    with pytest.raises(KeyboardInterrupt), building(entry) as partial:
        (partial / "table.arrow").write_text("half a table")
        raise KeyboardInterrupt  # Ctrl-C, or a crash in the decoder
    assert list(tmp_path.iterdir()) == []
    with building(entry) as partial:
        (partial / "table.arrow").write_text("a table")
    assert [p.name for p in tmp_path.iterdir()] == [entry.name]
    assert [p.name for p in entry.iterdir()] == ["table.arrow"]


def asrlaunch(*args: str) -> subprocess.CompletedProcess[str]:
    """The command line, in a process that then names the heavy packages it imported (none may be)."""
    probe = (
        "import sys\nfrom asrlaunch.cli.main import main\ncode = main(sys.argv[1:])\n"
        "heavy = [m for m in ('torch', 'transformers', 'pyarrow', 'datasets') if m in sys.modules]\n"
        "print('HEAVY', heavy, file=sys.stderr)\nsys.exit(code)\n"
    )
    command = [PYTHON, "-c", probe, *args]
    return subprocess.run(command, capture_output=True, text=True, env=python_env(), timeout=300)


def age(days: float, *paths: Path) -> None:
    then = time.time() - days * 86400
    for path in paths:
        os.utime(path, (then, then))


def test_the_cache_command_lists_each_entry_and_removes_only_what_no_run_uses(
    tones_corpus: Path, tmp_path: Path
) -> None:
    """`asrlaunch cache` lists tables, the processor, reports and builds with sizes and last use, without
    torch; a run that reads the cache marks what it uses; `--remove-idle-days` (1 or more) removes the
    entries idle that long, abandoned builds (with or without a lock file) and a removal stopped midway, and
    keeps what a run used since and a running build; `--dry-run` only says what it would take."""
    cache = tmp_path / "cache"
    prepare = ["prepare", str(RECIPES / "smoke.yaml"), f"data.dir={tones_corpus}", f"data.cache_dir={cache}"]
    assert asrlaunch(*prepare).returncode == 0
    used = sorted(folder.parent for folder in cache.glob(f"*/{TABLE_FILE}"))
    assert [folder.name.split("-")[0] for folder in used] == ["test", "train"]
    (processor,) = cache.glob("processor-*")
    stale = cache / "train-00000000stale"  # a corpus since changed: no run reads this table any more
    stale.mkdir()
    (stale / TABLE_FILE).write_bytes(b"\0" * 4096)
    report = cache / "bad-utterances-0123456789ab.tsv"
    report.write_text("split\tid\tfile\treason\n")
    age(40, *used, processor, stale, report)
    assert asrlaunch(*prepare).returncode == 0  # a run reads the tables and the processor from the cache
    host = socket.gethostname()
    abandoned, running = cache / f"train-1{PARTIAL}{host}-1", cache / f"train-2{PARTIAL}{host}-2"
    before_the_lock = cache / f"train-3{PARTIAL}{host}-3"  # a build killed before it held a lock
    stopped = cache / f"train-4{REMOVING}{host}-4"  # a removal killed midway
    for folder in (abandoned, running, before_the_lock, stopped):
        folder.mkdir()
        (folder / "table.arrow").write_bytes(b"\0" * 1024)
    for folder in (abandoned, running):
        (folder / LOCK).touch()
    age(MIN_ABANDONED_AGE_S / 86400 + 0.001, abandoned, running, before_the_lock, stopped)
    doomed = {stale, report, abandoned, before_the_lock, stopped}
    with open(running / LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # its builder runs
        listed = asrlaunch("cache", str(cache), "--json")
        text = asrlaunch("cache", str(cache))
        preview = asrlaunch("cache", str(cache), "--remove-idle-days", "30", "--dry-run")
        kept_by_the_preview = [path.name for path in doomed if path.exists()]
        zero = asrlaunch("cache", str(cache), "--remove-idle-days", "0")
        removal = asrlaunch("cache", str(cache), "--remove-idle-days", "30")
    assert "HEAVY []" in listed.stderr and listed.returncode == 0, listed.stderr
    entries = {Path(e["path"]).name: e for e in map(json.loads, listed.stdout.splitlines())}
    kinds = sorted(entry["kind"] for entry in entries.values())
    assert kinds == ["build", "build", "build", "processor", "removing", "report", "table", "table", "table"]
    assert {name for name, entry in entries.items() if entry["abandoned"]} == {
        abandoned.name,
        before_the_lock.name,
    }
    assert all(time.time() - entries[folder.name]["last_used"] < 600 for folder in [*used, processor])
    assert entries[stale.name]["size_bytes"] == 4096
    assert text.stdout.startswith(f"{cache}: 3 table(s), 1 processor(s), 1 report(s), 3 build(s), 1 ")
    assert "abandoned: its builder is gone" in text.stdout and "a removal stopped midway" in text.stdout
    assert sorted(line.split()[2] for line in preview.stdout.splitlines()[:-1]) == sorted(
        p.name for p in doomed
    )
    assert sorted(kept_by_the_preview) == sorted(path.name for path in doomed)
    assert zero.returncode == 2 and "a number of days, 1 or more" in zero.stderr
    assert removal.returncode == 0, removal.stderr
    assert f"removed {stale.name} (table, 4.0 KiB, 40 d idle)" in removal.stdout
    assert [path.name for path in doomed if path.exists()] == []
    assert [path.name for path in [*used, processor, running] if not path.exists()] == []
    assert not list(cache.glob(f"*{REMOVING}*"))  # each renamed out of the way, then deleted


def test_a_long_run_marks_its_tables_used_at_each_checkpoint(tones_corpus: Path, tmp_path: Path) -> None:
    """A run that outlasts the idle limit keeps its tables: it marks them at every checkpoint too."""
    from asrlaunch.core.logs import read_run_logs

    from .conftest import engine_command

    run_dir = tmp_path / "run"
    overrides = ["train.max_steps=4", "checkpoint.save_steps=2", "eval.at_start=false", "eval.steps=100"]
    stall = "stall@step=2,rank=0,phase=checkpoint,seconds=6"  # time to age the tables meanwhile
    run = subprocess.Popen(
        engine_command(run_dir, tones_corpus, 1, *overrides),
        env=python_env(ASRLAUNCH_FAULT=stall),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not any(r.get("event") == "fault" for r in read_run_logs(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    tables = [folder.parent for folder in (tmp_path / "cache").glob(f"*/{TABLE_FILE}")]
    age(40, *tables)
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr[-3000:]
    assert len(tables) == 2 and all(time.time() - t.stat().st_mtime < 600 for t in tables)


def test_a_complete_cache_mounted_read_only_is_enough_to_run(tones_corpus: Path, tmp_path: Path) -> None:
    """A shared cache another user built (or one mounted read-only): every table and the processor are
    there, so a run reads them and writes nothing into it."""
    from asrlaunch.data.timit import load_corpus

    cache, shared = tmp_path / "cache", tmp_path / "shared"
    built = load_corpus(tones_corpus, cache, 8, 4)
    shared.mkdir()
    if subprocess.run(["mount", "--bind", str(cache), str(shared)], capture_output=True).returncode:
        pytest.skip("cannot bind-mount here (needs root)")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(shared)], check=True)
        with pytest.raises(OSError):
            (shared / "probe").write_text("")  # read-only indeed
        again = load_corpus(tones_corpus, shared, 8, 4)
        assert again.cache_hit and again.vocab == built.vocab and len(again.train) == len(built.train)
    finally:
        subprocess.run(["umount", "-l", str(shared)], check=False)
