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

from asrlaunch.data.building import LOCK, MIN_ABANDONED_AGE_S, PARTIAL, building

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


def test_the_cache_command_lists_each_entry_and_removes_only_what_no_run_reads(
    tones_corpus: Path, tmp_path: Path
) -> None:
    """`asrlaunch cache` lists tables, the processor and builds with sizes and last use, without torch; a
    run that reads a table marks it used; `--remove-idle-days` removes the tables idle that long and an
    abandoned build, and keeps the tables a run read since, a running build and the processor."""
    cache = tmp_path / "cache"
    prepare = ["prepare", str(RECIPES / "smoke.yaml"), f"data.dir={tones_corpus}", f"data.cache_dir={cache}"]
    assert asrlaunch(*prepare).returncode == 0
    used = sorted(folder.parent for folder in cache.glob("*/table.arrow"))
    assert [folder.name.split("-")[0] for folder in used] == ["test", "train"]
    forty_days_ago = time.time() - 40 * 86400
    stale = cache / "train-00000000stale"  # a corpus since changed: no run reads this table any more
    stale.mkdir()
    (stale / "table.arrow").write_bytes(b"\0" * 4096)
    for folder in [*used, stale]:
        os.utime(folder, (forty_days_ago, forty_days_ago))
    assert asrlaunch(*prepare).returncode == 0  # a run reads both tables from the cache
    host = socket.gethostname()
    abandoned, running = cache / f"train-1{PARTIAL}{host}-1", cache / f"train-2{PARTIAL}{host}-2"
    for folder in (abandoned, running):
        folder.mkdir()
        (folder / LOCK).touch()
        past = time.time() - MIN_ABANDONED_AGE_S - 1
        os.utime(folder, (past, past))
    with open(running / LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # its builder runs
        listed = asrlaunch("cache", str(cache), "--json")
        text = asrlaunch("cache", str(cache))
        removal = asrlaunch("cache", str(cache), "--remove-idle-days", "30")
    assert "HEAVY []" in listed.stderr and listed.returncode == 0, listed.stderr
    entries = {Path(e["path"]).name: e for e in map(json.loads, listed.stdout.splitlines())}
    kinds = {name: entry["kind"] for name, entry in entries.items()}
    assert sorted(kinds.values()) == ["build", "build", "processor", "table", "table", "table"]
    assert entries[abandoned.name]["abandoned"] and not entries[running.name]["abandoned"]
    assert all(time.time() - entries[folder.name]["last_used"] < 600 for folder in used)
    assert entries[stale.name]["size_bytes"] == 4096
    assert text.stdout.startswith(f"{cache}: 3 table(s), 1 processor(s), 2 build(s), ")
    assert f"{abandoned.name}" in text.stdout and "abandoned: its builder is gone" in text.stdout
    assert removal.returncode == 0, removal.stderr
    assert f"removed {stale.name} (4.0 KiB, 40 d idle)" in removal.stdout
    assert not stale.exists() and not abandoned.exists()
    assert all(folder.exists() for folder in [*used, running, *cache.glob("processor-*")])
