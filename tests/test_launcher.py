"""The launcher without a cluster: dry runs, sbatch text, sweeps, hostile input, no torch."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from asrlaunch.core.exits import ExitCode
from asrlaunch.core.plan import plan_run
from asrlaunch.core.recipe import RecipeError, load_recipe
from asrlaunch.core.rundir import RunDir
from asrlaunch.launcher.submission import sbatch_text
from asrlaunch.launcher.sweep import element_name, expand_sweep, resolve_runs

from .conftest import PYTHON, RECIPES, ROOT, python_env
from .test_collect import synthetic_run

SUBMIT = str(ROOT / "launch" / "submit.py")
GOLDEN = Path(__file__).parent / "golden"


SMOKE = str(RECIPES / "smoke.yaml")


def submit(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, SUBMIT, *args], capture_output=True, text=True, cwd=cwd, env=python_env(), timeout=60
    )


@pytest.mark.parametrize(
    ("nodes", "gpus", "micro", "accum"),
    [(1, 8, 4, 1), (2, 4, 4, 1), (4, 8, 1, 1), (1, 1, 32, 1)],
)
def test_dry_run_json_gives_the_plan(tmp_path: Path, nodes: int, gpus: int, micro: int, accum: int) -> None:
    done = submit(
        str(RECIPES / "timit32.yaml"),
        f"cluster.nodes={nodes}",
        f"cluster.gpus_per_node={gpus}",
        "--dry-run",
        "--json",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["world_size"] == nodes * gpus
    assert (plan["micro_batch"], plan["grad_accum"]) == (micro, accum)
    assert (plan["steps_per_epoch"], plan["total_steps"]) == (145, 2900)
    assert f"#SBATCH --nodes={nodes}" in plan["sbatch"]
    assert f"#SBATCH --ntasks-per-node={gpus}" in plan["sbatch"]
    assert f"#SBATCH --gpus-per-node={gpus}" in plan["sbatch"]
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_timit32_dry_run_shows_the_reference_scripts_model_settings(tmp_path: Path) -> None:
    done = submit(str(RECIPES / "timit32.yaml"), "--dry-run", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    recipe = json.loads(done.stdout)["recipe"]
    overrides = recipe["model"]["overrides"]
    dropouts = tuple(
        f"{name}_dropout" for name in ("attention", "activation", "hidden", "feat_proj", "final")
    )
    assert {key: overrides[key] for key in dropouts} == dict.fromkeys(dropouts, 0.0)
    masking = (overrides["mask_time_prob"], overrides["mask_time_length"], overrides["layerdrop"])
    assert masking == (0.05, 10, 0.0)
    assert recipe["logging"]["steps"] == 10 and recipe["eval"]["steps"] == 100
    assert recipe["data"]["text_normalization"] == "reference"


def test_micro_batch_limit_becomes_accumulation(tmp_path: Path) -> None:
    done = submit(
        str(RECIPES / "timit32.yaml"), "train.max_micro_batch_size=8", "--dry-run", "--json", cwd=tmp_path
    )
    plan = json.loads(done.stdout)
    assert (plan["world_size"], plan["micro_batch"], plan["grad_accum"]) == (1, 8, 4)


def test_impossible_split_fails_with_the_clear_error(tmp_path: Path) -> None:
    done = submit(str(RECIPES / "timit32.yaml"), "cluster.gpus_per_node=3", "--dry-run", cwd=tmp_path)
    assert done.returncode == 2
    assert "cannot be split evenly over 3 processes" in done.stderr
    assert "1, 2, 4, 8, 16, 32" in done.stderr
    assert "Traceback" not in done.stderr


def test_dry_run_text_shows_recipe_plan_script_and_run_dir(tmp_path: Path) -> None:
    done = submit(str(RECIPES / "timit32.yaml"), "--dry-run", cwd=tmp_path)
    assert done.returncode == 2 and "error: data.dir: " in done.stderr, done.stderr  # no TIMIT here
    text = done.stdout
    assert "# resolved recipe" in text and "name_or_path: facebook/wav2vec2-base" in text
    assert "global batch 32 = micro-batch 32 x grad accumulation 1 x world size 1" in text
    assert "145 steps/epoch, 2900 steps (20.0 epochs), warmup 1000 steps (34.5%)" in text
    assert "#!/bin/bash" in text and "runs/timit32" in text


@pytest.mark.parametrize("script", ["submit", "preflight", "status", "collect"])
def test_launcher_side_never_imports_torch(tmp_path: Path, script: str) -> None:
    """`--dry-run` (its preflight too), `status` and `collect` import no torch, transformers, deepspeed,
    datasets, accelerate."""
    synthetic_run(tmp_path / "run")
    argv = {
        "submit": [str(RECIPES / "timit32.yaml"), "--dry-run", "--json"],
        "preflight": [SMOKE, "model.overrides.mask_time_prb=0.05", "--dry-run"],
        "status": [str(tmp_path / "run"), "--json"],
        "collect": [str(tmp_path / "run")],
    }[script]
    path = ROOT / "launch" / f"{'submit' if script == 'preflight' else script}.py"
    probe = (
        "import sys, runpy\n"
        f"sys.argv = [{str(path)!r}, *{argv!r}]\n"
        "try:\n"
        f"    runpy.run_path({str(path)!r}, run_name='__main__')\n"
        "except SystemExit as end:\n"
        "    print('EXIT', end.code, file=sys.stderr)\n"
        "heavy = [m for m in ('torch', 'transformers', 'deepspeed', 'datasets', 'accelerate')\n"
        "         if m in sys.modules]\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    done = subprocess.run(
        [PYTHON, "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=python_env(), timeout=120
    )
    assert "HEAVY []" in done.stderr, done.stderr
    if script == "preflight":
        assert "EXIT 2" in done.stderr and "model keys: model.overrides.mask_time_prb" in done.stdout
        return
    assert "EXIT 0" in done.stderr or "EXIT" not in done.stderr, done.stderr
    if script == "submit":
        assert json.loads(done.stdout)["world_size"] == 1
    if script == "collect":
        assert (tmp_path / "run" / "results.md").exists() and (tmp_path / "run" / "curves.png").exists()


def test_sbatch_text_matches_the_golden_file(tmp_path: Path) -> None:
    recipe = load_recipe(
        RECIPES / "timit32.yaml",
        [
            "cluster.nodes=2",
            "cluster.gpus_per_node=4",
            "cluster.partition=gpu",
            "cluster.account=asr-team",
            "cluster.extra_sbatch={exclusive: user}",
        ],
    )
    text = sbatch_text(recipe, tmp_path / "submitit", [tmp_path])
    text = text.replace(str(tmp_path), "<RUN>").replace(sys.executable, "<PYTHON>")
    golden = GOLDEN / "timit32_2x4.sbatch"
    assert golden.exists(), f"missing {golden}: write it from this test's text, review it, commit it"
    assert text == golden.read_text()


def test_sweep_is_a_cross_product_with_one_dir_each() -> None:
    assert expand_sweep(["train.lr=1e-4,3e-4", "train.seed=1,2"]) == [
        ("train.lr=1e-4", "train.seed=1"),
        ("train.lr=1e-4", "train.seed=2"),
        ("train.lr=3e-4", "train.seed=1"),
        ("train.lr=3e-4", "train.seed=2"),
    ]
    raw = {"data": {"dir": "x", "expected_train_size": 10}, "run": {"name": "sw"}}
    specs = resolve_runs(raw, "t", [], ["train.lr=1e-4,3e-4", "train.seed=1,2"])
    assert [str(s.run_dir) for s in specs] == [
        "runs/sw/lr=1e-4_seed=1",
        "runs/sw/lr=1e-4_seed=2",
        "runs/sw/lr=3e-4_seed=1",
        "runs/sw/lr=3e-4_seed=2",
    ]
    assert specs[3].recipe.train.lr == pytest.approx(3e-4) and specs[3].recipe.train.seed == 2
    assert element_name(["run.name=a;b$(x)"]) == "name=a-b--x-"
    assert element_name(["train.adam_betas=[0.9, 0.98]", "train.lr=1e-3"]) == "adam_betas=0.9-0.98_lr=1e-3"
    with pytest.raises(RecipeError, match="must look like"):
        expand_sweep(["train.lr"])
    # a bare key of one section stands for it (`--sweep seed=1,2`); an ambiguous one is refused
    assert expand_sweep(["seed=1,2"]) == [("train.seed=1",), ("train.seed=2",)]
    with pytest.raises(RecipeError, match=r"write one of eval\.steps, logging\.steps"):
        expand_sweep(["steps=10,20"])
    with pytest.raises(RecipeError, match=r"sweep over cluster\.nodes"):
        expand_sweep(["nodes=1,2"])


def test_sweep_dry_run_shows_every_element_and_an_array(tmp_path: Path) -> None:
    done = submit(
        str(RECIPES / "smoke.yaml"),
        "--sweep",
        "train.lr=1e-3,3e-3",
        "--sweep",
        "train.seed=1,2",
        "--dry-run",
        "--json",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert len(plan["runs"]) == 4
    assert "#SBATCH --array=0-3%4" in plan["sbatch"]


def test_a_sweep_runs_at_most_array_parallelism_elements_at_once(tmp_path: Path) -> None:
    sweep = ("--sweep", "train.lr=1e-3,3e-3,1e-2", "cluster.array_parallelism=2", "--dry-run")
    done = submit(str(RECIPES / "smoke.yaml"), *sweep, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "#SBATCH --array=0-2%2" in done.stdout


def test_the_dry_run_shows_the_preparation_job_and_the_dependency(tmp_path: Path) -> None:
    prepare = ("cluster.prepare_partition=debug", f"data.dir={tmp_path / 'absent'}", "--dry-run", "--json")
    done = submit(str(RECIPES / "smoke.yaml"), *prepare, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert "#SBATCH --partition=debug" in shown["prepare_sbatch"] and "--gpus" not in shown["prepare_sbatch"]
    assert "#SBATCH --dependency=afterok:PREPARATION_JOB_ID" in shown["sbatch"]


def test_a_cache_dir_that_names_a_variable_unset_here_is_prepared_by_the_job_on_each_node(
    tmp_path: Path, tones_corpus: Path
) -> None:
    """`$SLURM_TMPDIR` is set only in a job, on each node's own disk: no preparation job can fill it."""
    node_local = ("data.cache_dir=$ASRLAUNCH_TEST_UNSET/asr", "cluster.prepare_partition=debug")
    dry = ("--dry-run", "--executor=local")
    done = submit(SMOKE, f"data.dir={tones_corpus}", *node_local, *dry, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    told = "names $ASRLAUNCH_TEST_UNSET (a job's own, or unset here): the job prepares the corpus on each"
    assert told in done.stdout
    assert "asrlaunch prepare" not in done.stdout  # a corpus not in a cache here would have one (test_cli.py)


HOSTILE = [
    "run.name=x;touch PWNED",
    "run.name=$(touch PWNED)",
    "run.name=`touch PWNED`",
    "cluster.partition=debug\n#SBATCH --wrap=touch PWNED",
    "cluster.account=a b",
    "cluster.qos=$(touch PWNED)",
    "cluster.extra_sbatch={comment: '$(touch PWNED)'}",
    "cluster.extra_sbatch={'x;touch PWNED': y}",
    "run.output_root=/tmp/$(touch PWNED)",
    "cluster.constraint=a;touch PWNED",
]


@pytest.mark.parametrize("override", HOSTILE)
def test_hostile_strings_are_refused_and_nothing_runs(tmp_path: Path, override: str) -> None:
    # A real submission (no --dry-run): a string that got through would run, or write the run's folder.
    done = submit(str(RECIPES / "smoke.yaml"), override, "--executor", "local", cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert any(words in done.stderr for words in ("may only hold", "hold only letters", "not allowed"))
    assert not (tmp_path / "PWNED").exists()
    assert not (tmp_path / "runs").exists()


def test_torch_environment_of_a_slurm_task() -> None:
    from asrlaunch.job.task import SlurmTask, master_port

    def torch_env_from_slurm(
        environ: dict[str, str], resolve_address: Callable[[str], str]
    ) -> dict[str, str]:
        return SlurmTask.from_environ(environ).torch_environment(resolve_address)

    environ = {
        "SLURM_JOB_ID": "4242",
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS": "8",
        "SLURM_NTASKS_PER_NODE": "4(x2)",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
    }
    env = torch_env_from_slurm(environ, resolve_address=lambda nodelist: f"10.0.0.7 for {nodelist}")
    assert env == {
        "RANK": "5",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "8",
        "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "10.0.0.7 for gpu[07-08]",
        "MASTER_PORT": str(master_port("4242")),
    }
    # The batch script resolves the address once for all its tasks: they then ask the controller nothing.
    exported = {**environ, "ASRLAUNCH_MASTER_ADDR": "10.0.0.9"}
    once = torch_env_from_slurm(exported, resolve_address=lambda _: pytest.fail("asked the controller"))
    assert once["MASTER_ADDR"] == "10.0.0.9"
    # Which node a task is on (the ranks of a node share a node-local corpus cache).
    assert SlurmTask.from_environ({**environ, "SLURMD_NODENAME": "gpu08"}).node_name() == "gpu08"
    # Array elements sharing a node need their own port: each has its own SLURM_JOB_ID (4243 = 4200_3 here),
    # whatever its array's id; 1000 elements of one array, or elements of arrays 20 ids apart, never collide.
    element = {"SLURM_ARRAY_JOB_ID": "4200", "SLURM_ARRAY_TASK_ID": "3"}
    ports = {
        torch_env_from_slurm({**environ, **element, "SLURM_JOB_ID": str(job)}, lambda _: "x")["MASTER_PORT"]
        for job in range(4200, 5200)
    }
    assert len(ports) == 1000 and env["MASTER_PORT"] in ports
    # Below the ephemeral ports (32768-60999) that a busy node's outgoing connections hold, for any job id.
    every = {master_port(str(job_id)) for job_id in range(0, 500_000, 7)}
    assert min(every) >= 1024 and max(every) < 32768 and len(every) > 10_000


def test_dry_run_works_off_the_cluster(tmp_path: Path) -> None:
    """No srun, no sinfo on PATH (a laptop): the plan and the sbatch script still show, in both forms; the
    plain one also runs the preflight (which asks SLURM nothing it cannot find) and refuses only for the
    missing TIMIT."""

    def dry_run(*flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PYTHON, SUBMIT, str(RECIPES / "timit32.yaml"), "--dry-run", *flags],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=60,
            env=python_env(PATH=str(Path(PYTHON).parent)),
        )

    as_json = dry_run("--json")
    assert as_json.returncode == 0, as_json.stderr
    assert "srun --unbuffered" in json.loads(as_json.stdout)["sbatch"]
    plain = dry_run()
    assert plain.returncode == ExitCode.USAGE and "Traceback" not in plain.stderr, plain.stderr
    assert "the TIMIT folder does not exist" in plain.stderr
    assert "# preflight   ok  engine" in plain.stdout and "srun --unbuffered" in plain.stdout


def test_status_watch_refreshes_until_interrupted(tmp_path: Path) -> None:
    synthetic_run(tmp_path)
    watch = [PYTHON, str(ROOT / "launch" / "status.py"), str(tmp_path), "--watch", "0.3"]
    watcher = subprocess.Popen(  # started with SIGINT ignored, as a non-interactive shell's background job is
        ["bash", "-c", 'trap "" INT; exec "$@"', "bash", *watch],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=python_env(),
    )
    assert watcher.stdout is not None
    seen = ""
    while seen.count("RUN ") < 3:  # interrupt only once it has redrawn: a slow start is no failure
        line = watcher.stdout.readline()
        assert line, f"the watch ended by itself: {watcher.communicate(timeout=30)}"
        seen += line
    watcher.send_signal(signal.SIGINT)
    rest, err = watcher.communicate(timeout=30)
    out = seen + rest
    assert watcher.returncode == 0 and "Traceback" not in err
    assert out.count("\033[2J") >= 3 and out.count("RUN ") >= 3  # the table, redrawn
    assert " 16/" in out and "preemption x2" in out  # step 16 from the logs; two stops counted


def test_a_preparation_job_prepares_each_corpus_once_and_tells_every_run(
    tmp_path: Path, tones_corpus: Path
) -> None:
    """Two sweep elements of one corpus and a run of a broken one: the corpus is prepared once, both elements
    are told; the broken one fails the job, and a run after it in the job is told of that failure too."""
    from asrlaunch.job.entry import PrepareJob

    def run_of(name: str, *overrides: str) -> RunDir:
        recipe = load_recipe(RECIPES / "smoke.yaml", [f"data.cache_dir={tmp_path / 'cache'}", *overrides])
        run_dir = RunDir(tmp_path / name)
        run_dir.create(recipe.to_yaml(), plan_run(recipe, 1).to_dict())
        return run_dir

    first = run_of("lr=1", f"data.dir={tones_corpus}", "train.lr=1e-3")
    second = run_of("lr=2", f"data.dir={tones_corpus}", "train.lr=2e-3")
    broken = run_of("broken", f"data.dir={tmp_path / 'absent'}", "data.generate=null")
    after = run_of("after", f"data.dir={tones_corpus}", "train.seed=3")
    with pytest.raises(Exception, match="absent"):
        PrepareJob()([str(r.path) for r in (first, second, broken, after)])
    assert [first.read_prepared()["cache"], second.read_prepared()["cache"]] == ["built", "built"]
    for run_dir in (broken, after):
        outcome = run_dir.read_prepared()
        assert outcome["ok"] is False and "absent" in outcome["error"]
