"""The one CLI: `asrlaunch COMMAND`, the launch/ scripts users know, every recipe's dry run, and the rule of
what a resume may change, checked before anything is queued."""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from asrlaunch.cli.main import COMMANDS
from asrlaunch.core.plan import plan_run
from asrlaunch.core.recipe import load_recipe
from asrlaunch.core.rundir import RunDir

from .conftest import PYTHON, RECIPES, ROOT, python_env

ASRLAUNCH = str(Path(PYTHON).parent / "asrlaunch")


def run(*command: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(command), capture_output=True, text=True, cwd=cwd, env=python_env(), timeout=120
    )


def test_asrlaunch_lists_its_commands_and_names_the_valid_ones_on_a_typo() -> None:
    shown = run(ASRLAUNCH, "--help")
    assert shown.returncode == 0
    for name in ("submit", "status", "collect", "train", "evaluate", "cluster", *COMMANDS):
        assert f"\n  {name} " in shown.stdout, name
    typo = run(ASRLAUNCH, "sumbit")
    assert typo.returncode == 2 and typo.stderr.startswith(
        "error: unknown command 'sumbit'; the commands are: "
    )
    assert "submit" in typo.stderr and len(typo.stderr.splitlines()) == 1
    assert run(PYTHON, "-m", "asrlaunch", "status", "--help").stdout.startswith("usage: asrlaunch status")


@pytest.mark.parametrize("script", ["submit", "status", "collect"])
def test_the_launch_scripts_are_the_same_commands(script: str) -> None:
    shown = run(PYTHON, str(ROOT / "launch" / f"{script}.py"), "--help")
    assert shown.returncode == 0 and shown.stdout.startswith(f"usage: asrlaunch {script}")


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_every_recipe_dry_runs(tmp_path: Path, recipe: str, monkeypatch: pytest.MonkeyPatch) -> None:
    done = run(ASRLAUNCH, "submit", str(RECIPES / recipe), "--dry-run", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    monkeypatch.chdir(tmp_path)  # relative paths are read from where the recipe is resolved
    loaded = load_recipe(RECIPES / recipe)
    assert shown["recipe"] == loaded.to_dict()
    assert shown["total_steps"] == plan_run(loaded, loaded.cluster.world_size).total_steps
    assert "srun --unbuffered" in shown["sbatch"] and not (tmp_path / "runs").exists()


def test_a_run_reads_the_folders_its_submission_named_wherever_it_is_resumed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative data.dir and a `~` output root are resolved at submission: the dry run's script names the
    folders, and the run's recipe the corpus that a resume from another directory then finds; an older run's
    relative data.dir is still read from where it was submitted, and nowhere else."""
    from asrlaunch.data.synth import generate_corpus

    home, here, elsewhere = (tmp_path / name for name in ("home", "here", "elsewhere"))
    generate_corpus(here / "corpus", train=8, test=4)
    elsewhere.mkdir()
    overrides = (
        "data.dir=corpus",
        "data.generate=null",
        "data.expected_train_size=8",
        "run.output_root=~/runs",
    )
    env = python_env(HOME=str(home))
    dry = subprocess.run(
        [ASRLAUNCH, "submit", str(RECIPES / "smoke.yaml"), *overrides, "--dry-run", "--json"],
        capture_output=True,
        text=True,
        cwd=here,
        env=env,
        timeout=120,
    )
    assert dry.returncode == 0, dry.stderr
    shown = json.loads(dry.stdout)
    assert shown["recipe"]["data"]["dir"] == str(here / "corpus")
    assert str(home / "runs" / "smoke") in shown["sbatch"] and "~" not in shown["sbatch"]

    monkeypatch.chdir(here)  # the submission: its recipe.yaml
    recipe = load_recipe(RECIPES / "smoke.yaml", overrides[:3])
    run_dir = RunDir(tmp_path / "runs" / "smoke")
    run_dir.create(recipe.to_yaml(), plan_run(recipe, 1).to_dict())
    resumed = run(ASRLAUNCH, "submit", "--resume", str(run_dir), "--dry-run", cwd=elsewhere)
    assert resumed.returncode == 0, resumed.stderr
    assert f"ok  data: {here / 'corpus'}" in resumed.stdout, resumed.stdout
    # A run from before paths were resolved keeps its relative data.dir: never read from another directory.
    recorded = json.loads(json.dumps(recipe.to_dict()))
    recorded["data"]["dir"] = "corpus"
    run_dir.recipe.write_text(json.dumps(recorded))
    refused = run(ASRLAUNCH, "submit", "--resume", str(run_dir), "--dry-run", cwd=elsewhere)
    assert refused.returncode == 2 and "data.dir: corpus: " in refused.stdout, refused.stdout
    assert run(ASRLAUNCH, "submit", "--resume", str(run_dir), "--dry-run", cwd=here).returncode == 0


def test_a_resume_may_not_change_what_makes_the_run(tmp_path: Path) -> None:
    recipe = load_recipe(RECIPES / "smoke.yaml", [f"data.dir={tmp_path / 'corpus'}"])
    run_dir = RunDir(tmp_path / "runs" / "smoke")
    run_dir.create(recipe.to_yaml(), plan_run(recipe, 1).to_dict())
    refused = run(ASRLAUNCH, "submit", "--resume", str(run_dir), "train.lr=3e-4", "seed=7", cwd=tmp_path)
    assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1, refused.stderr
    assert refused.stderr.startswith("error: train.lr, train.seed: a resumed run keeps its recipe except ")
    assert not run_dir.job.exists()  # nothing was queued
    changes = ("cluster.time_min=30", "train.max_steps=5")
    allowed = run(ASRLAUNCH, "submit", "--resume", str(run_dir), *changes, "--dry-run", cwd=tmp_path)
    assert allowed.returncode == 0, allowed.stderr
    backend = run(ASRLAUNCH, "submit", "--resume", str(run_dir), "train.backend=deepspeed", "--dry-run")
    assert backend.returncode == 2 and backend.stderr.startswith("error: train.backend: a resumed run")
    # Stopped at step 150 of 260 (warmup 50): a run twice as long resumes at a higher learning rate.
    plan = {**plan_run(recipe, 1).to_dict(), "total_steps": 260}
    start = {"kind": "meta", "step": 0, "epoch": 0.0, "rank": 0, "attempt": 0, "time": 1.0, "plan": plan}
    window = {"kind": "train", "step": 150, "epoch": 11.5, "rank": 0, "attempt": 0, "time": 2.0, "loss": 1.0}
    run_dir.rank_log(0).write_text("".join(json.dumps(r) + "\n" for r in (start, window)))
    longer = run(ASRLAUNCH, "submit", "--resume", str(run_dir), "train.max_steps=520", "--dry-run")
    assert longer.returncode == 0 and "warning: train.max_steps: 260 -> 520 steps" in longer.stderr
    assert "at step 150 goes from 0.00157 to 0.00236" in longer.stderr, longer.stderr


PROBE = """
import gc, json, sys
from asrlaunch.cli.main import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "enabled": gc.isenabled(), "frozen": gc.get_freeze_count()}))
"""


def test_a_training_process_collects_once_after_start_up_and_freezes_what_lives(
    tones_corpus: Path, tmp_path: Path
) -> None:
    """core/gc_policy.py: no collection while torch and transformers import, then the survivors frozen."""
    command = [
        "train",
        str(RECIPES / "smoke.yaml"),
        "--run-dir",
        str(tmp_path / "run"),
        f"data.dir={tones_corpus}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "train.max_steps=1",
        "eval.at_start=false",
    ]
    done = run(PYTHON, "-c", PROBE, *command)
    assert done.returncode == 0, done.stderr[-2000:]
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert probe["code"] == 0 and probe["enabled"] and probe["frozen"] > 100_000
    status = run(PYTHON, "-c", PROBE, "status", str(tmp_path / "run"))
    assert json.loads(status.stdout.strip().splitlines()[-1])["frozen"] == 0  # the launcher's: untouched


def train_extra_modules() -> set[str]:
    """The import names of what `pip install '.[train]'` adds to the base install (pyproject's lists)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=!~\[; ]", spec)[0].lower() for spec in project["optional-dependencies"]["train"]}
    base = {re.split(r"[<>=!~\[; ]", spec)[0].lower() for spec in project["dependencies"]}
    return {name.replace("-", "_") for name in names - base}


def base_install(tmp_path: Path) -> Path:
    """A view of this environment's site-packages without the [train] extra's packages: what a login node
    with `pip install asrlaunch` has (their own dependencies stay; only the named packages are absent)."""
    hidden = train_extra_modules()
    view = tmp_path / "site-packages"
    view.mkdir()
    (site_packages,) = {p for p in Path(PYTHON).parent.parent.glob("lib/python3*/site-packages")}
    for entry in site_packages.iterdir():
        if re.split(r"[.-]", entry.name)[0].lower() not in hidden:
            (view / entry.name).symlink_to(entry)
    return view


def test_the_launcher_commands_run_on_the_base_install(
    tmp_path: Path, tones_corpus: Path, trained_smoke: Path
) -> None:
    """submit's dry run (preflight, and whether a preparation job is needed), status and collect, with torch,
    transformers, pyarrow, soundfile and the rest of the [train] extra not installed; a real submission from
    there is refused before anything is queued: the job's tasks would run this Python."""
    assert {"torch", "transformers", "pyarrow", "soundfile"} <= train_extra_modules()
    env = {**python_env(), "PYTHONPATH": f"{base_install(tmp_path)}:{ROOT / 'src'}"}

    def base(*command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PYTHON, "-S", "-m", "asrlaunch", *command],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=120,
        )

    corpus = [f"data.dir={tones_corpus}", f"data.cache_dir={tmp_path / 'cache'}"]
    smoke = str(RECIPES / "smoke.yaml")
    dry = base("submit", smoke, *corpus, "cluster.prepare_partition=debug", "--dry-run", "--executor=local")
    assert dry.returncode == 2 and "(a submission would be refused; " in dry.stderr, dry.stderr
    assert "# preflight FAIL  engine: the job runs " in dry.stdout and "lacks torch, " in dry.stdout
    assert "# preflight skip  data: " in dry.stdout and "soundfile is not installed" in dry.stdout
    assert "asrlaunch prepare" in dry.stdout  # the corpus is not in this cache: a preparation job first
    refused = base("submit", smoke, *corpus, "--executor", "local")
    assert refused.returncode == 2 and "pip install 'asrlaunch[train]'" in refused.stderr, refused.stderr
    assert "nothing was submitted" in refused.stderr and not (tmp_path / "runs").exists()
    status = base("status", str(trained_smoke))
    assert status.returncode == 0 and "200/200" in status.stdout, status.stderr
    collect = base("collect", str(trained_smoke))
    assert collect.returncode == 0 and "Wer" in collect.stdout, collect.stderr


SMOKE = str(RECIPES / "smoke.yaml")


@pytest.mark.parametrize(
    ("command", "lines"),
    [
        (
            ["submit", SMOKE, "--json", "--force"],
            ["--json goes with --dry-run", "--force goes with --resume"],
        ),
        (
            [
                "submit",
                SMOKE,
                "foo",
                "train.lr=5",
                "--sweep",
                "train.lr=1e-3,2e-3",
                "--sweep",
                "cluster.nodes=1,2",
                "--sweep",
                "train.seed=1,,2",
                "--sweep",
                "train.seed=3",
                "--dry-run",
            ],
            [
                "override 'foo' must look like section.key=value",
                "train.lr is swept or overridden twice",
                "sweep over cluster.nodes: the elements of a job array share one job shape",
                "sweep 'train.seed=1,,2': an empty value",
                "train.seed is swept or overridden twice",
            ],
        ),
        (
            ["submit", SMOKE, "--sweep", "train.seed=1,x", "--sweep", "train.lr=1e-3,abc", "--dry-run"],
            [
                "2 problem(s):",
                "train.lr: Input should be a valid number",
                "train.seed: Input should be a valid integer",
            ],
        ),
        (
            ["submit", SMOKE, "--sweep", "train.lr=1e-3,0.001", "--dry-run"],
            ["lr=1e-3 and lr=0.001 are the same run"],
        ),
        (
            [
                "submit",
                SMOKE,
                "cluster.extra_sbatch={signal: USR1@10, time: '5', mail_type: END, gpus_per_task: '1'}",
                "--dry-run",
            ],
            [
                "cluster.extra_sbatch.signal: the launcher sets --signal itself; use cluster.signal_delay_s",
                "cluster.extra_sbatch.time: the launcher sets --time itself; use cluster.time_min",
                "cluster.extra_sbatch.gpus_per_task: one GPU per task is not supported (DeepSpeed picks",
            ],
        ),
        (
            ["submit", SMOKE, "train.epochs=.inf", "train.lr=.nan", "--dry-run"],
            ["train.lr: Input should be a finite"],
        ),
        (["submit", ".", "--dry-run"], [".: cannot be read"]),
        (["status", "nonexistent", "."], ["nonexistent: does not exist", ".: no run directory"]),
        (
            ["collect", "nonexistent", "--compare", SMOKE],
            ["--compare", "no results table", "nonexistent: no run"],
        ),
    ],
    ids=[
        "flags",
        "command line",
        "elements",
        "same run",
        "extra_sbatch",
        "infinite",
        "folder",
        "status",
        "collect",
    ],
)
def test_every_problem_of_a_command_is_reported_at_once_and_nothing_is_written(
    tmp_path: Path, command: list[str], lines: list[str]
) -> None:
    done = run(ASRLAUNCH, *command, cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and not list(tmp_path.iterdir())
    for line in lines:
        assert line in done.stderr, (line, done.stderr)


def test_a_dry_run_refuses_what_the_submission_would(tmp_path: Path) -> None:
    """A run directory that holds a run already, or a sweep's runs, or lies inside a run; a finished run
    resumed; a model path that is neither a folder nor a hub id."""
    recipe = load_recipe(RECIPES / "smoke.yaml", [f"data.dir={tmp_path / 'corpus'}"])
    RunDir(tmp_path / "runs" / "smoke").create(recipe.to_yaml(), plan_run(recipe, 1).to_dict())
    taken = run(ASRLAUNCH, "submit", SMOKE, "--dry-run", "--no-preflight", cwd=tmp_path)
    assert taken.returncode == 2 and "runs/smoke holds a run already" in taken.stderr
    path = run(
        ASRLAUNCH,
        "submit",
        SMOKE,
        "run.name=other",
        "model.config=null",
        "model.name_or_path=./m!",
        "--dry-run",
    )
    assert (
        path.returncode == 2
        and "FAIL  model: model.name_or_path: ./m! is neither a folder here nor a hub id" in path.stdout
    )
    watch = run(ASRLAUNCH, "status", str(tmp_path / "runs" / "smoke"), "--watch", "-1")
    assert watch.returncode == 2 and "a number of seconds above 0" in watch.stderr
    sweep = ("--sweep", "train.lr=1e-4,2e-4", "--dry-run", "--no-preflight")
    inside = run(ASRLAUNCH, "submit", SMOKE, *sweep, cwd=tmp_path)  # its elements would be inside the run
    assert inside.returncode == 2 and "runs/smoke is a run, not a sweep's folder" in inside.stderr
    element = RunDir(tmp_path / "runs" / "sw" / "lr=0.0001")
    element.create(recipe.to_yaml(), plan_run(recipe, 1).to_dict())
    over = run(ASRLAUNCH, "submit", SMOKE, "run.name=sw", "--dry-run", "--no-preflight", cwd=tmp_path)
    assert over.returncode == 2 and "runs/sw holds a sweep's runs" in over.stderr
    finished = RunDir(tmp_path / "runs" / "smoke")
    finished.final.mkdir(parents=True)
    finished.mark_finished(3)
    again = run(ASRLAUNCH, "submit", "--resume", str(finished.path), "--dry-run", "--no-preflight")
    assert (
        again.returncode == 2 and "finished already" in again.stderr and "model.name_or_path=" in again.stderr
    )


def test_a_resume_that_would_end_before_its_checkpoint_is_refused_before_the_queue(tmp_path: Path) -> None:
    """`train.max_steps` below the newest checkpoint: refused by `submit --resume` itself (the job would wait
    in the queue, start, and only then refuse), with the step to set; at or above it, the plan shows."""
    recipe = load_recipe(RECIPES / "smoke.yaml", [f"data.dir={tmp_path / 'corpus'}"])
    stopped = RunDir(tmp_path / "runs" / "smoke")
    stopped.create(recipe.to_yaml(), plan_run(recipe, 1).to_dict())
    (stopped.checkpoints / "step-000010").mkdir(parents=True)
    # Attempt 0 started and checkpointed; attempt 1 died while starting (only failover's event logged it).
    base = {"kind": "meta", "epoch": 0.0, "rank": 0, "time": 1.0}
    started = {**base, "step": 0, "attempt": 0, "plan": plan_run(recipe, 1).to_dict(), "resumed_from": None}
    died = {**base, "step": 10, "attempt": 1, "event": "failure", "action": "requeue"}
    stopped.logs.mkdir(parents=True, exist_ok=True)
    stopped.rank_log(0).write_text("".join(json.dumps(r) + "\n" for r in (started, died)))
    resume = ("submit", "--resume", str(stopped.path), "--dry-run", "--no-preflight")
    short = run(ASRLAUNCH, *resume, "train.max_steps=7")
    assert short.returncode == 2 and "Traceback" not in short.stderr, short.stderr
    assert "the run ends at step 7, before its step-10 checkpoint; set train.max_steps to 10" in short.stderr
    enough = run(ASRLAUNCH, *resume, "train.max_steps=10")
    assert enough.returncode == 0, enough.stderr
