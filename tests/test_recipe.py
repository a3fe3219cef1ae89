"""Every recipe loads; broken recipes fail with one line per problem, naming the key."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from asrlaunch.core.recipe import Recipe, RecipeError, load_recipe, load_run_recipe, parse_overrides

from .conftest import RECIPES, ROOT

ALL_RECIPES = sorted(RECIPES.glob("*.yaml"))


@pytest.mark.parametrize("path", ALL_RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.train.global_batch_size % recipe.cluster.world_size == 0


def test_timit32_states_the_reference_card() -> None:
    recipe = load_recipe(RECIPES / "timit32.yaml")
    train = recipe.train
    assert recipe.model.name_or_path == "facebook/wav2vec2-base"
    assert recipe.model.config is None
    assert (train.lr, train.global_batch_size, recipe.eval.batch_size, train.seed) == (1e-4, 32, 1, 42)
    assert (train.adam_betas, train.adam_eps) == ((0.9, 0.999), 1e-8)
    assert (train.lr_scheduler, train.warmup_steps, train.epochs) == ("linear", 1000, 20)
    assert train.mixed_precision == "fp16"
    assert recipe.eval.steps == 100
    assert recipe.data.expected_train_size == 4620


def test_overrides_are_typed_and_nested(tmp_path: Path) -> None:
    recipe = load_recipe(
        RECIPES / "smoke.yaml",
        [
            "train.max_steps=12",
            "train.lr=3e-4",
            "data.dir=/x/y",
            "train.adam_betas=[0.8, 0.9]",
            "eval.at_start=false",
            "seed=7",  # a bare key of one section only
        ],
    )
    assert recipe.train.max_steps == 12 and recipe.train.seed == 7
    assert recipe.train.lr == pytest.approx(3e-4)
    assert recipe.data.dir == "/x/y"
    assert recipe.train.adam_betas == (0.8, 0.9)
    assert recipe.eval.at_start is False
    assert parse_overrides(["a.b.c=1", "a.b.d=x"]) == {"a": {"b": {"c": 1, "d": "x"}}}


def _write(tmp_path: Path, mutate: dict) -> Path:
    base = yaml.safe_load((RECIPES / "smoke.yaml").read_text())
    for dotted, value in mutate.items():
        target = base
        *parents, leaf = dotted.split(".")
        for part in parents:
            target = target.setdefault(part, {})
        if value is _DELETE:
            target.pop(leaf)
        else:
            target[leaf] = value
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


_DELETE = object()

BROKEN: dict[str, tuple[dict[str, Any], str]] = {
    "unknown top-level section": (
        {"trian.lr": 1.0},
        "trian: unknown key; valid keys here: checkpoint, cluster",
    ),
    "unknown key in a section": (
        {"train.learning_rate": 1e-4},
        "train.learning_rate: unknown key; valid keys here: adam_betas",
    ),
    "negative learning rate": ({"train.lr": -1.0}, "train.lr: Input should be greater than 0"),
    "lr as text": ({"train.lr": "fast"}, "train.lr: Input should be a valid number"),
    "unknown optimizer": ({"train.optimizer": "sgd"}, "train.optimizer: Input should be 'adamw' or 'adam'"),
    "unknown precision": (
        {"train.mixed_precision": "fp8"},
        "train.mixed_precision: Input should be 'no', 'fp16' or 'bf16'",
    ),
    "eval batch other than 1": ({"eval.batch_size": 8}, "eval.batch_size: Input should be 1"),
    "missing data dir": ({"data.dir": _DELETE}, "data.dir: required key is missing"),
    "beta out of range": ({"train.adam_betas": [0.9, 1.5]}, "train.adam_betas: each beta must be in [0, 1)"),
    "hostile partition": (
        {"cluster.partition": "gpu; rm -rf /"},
        "cluster.partition: value 'gpu; rm -rf /' must start with a letter or digit and hold only",
    ),
    "hostile run name": (
        {"run.name": "$(reboot)"},
        "run.name: run name '$(reboot)' must start with a letter or digit",
    ),
    "compile under deepspeed": (
        {"train.compile": True, "train.backend": "deepspeed"},
        "train: train.compile works with train.backend ddp (DeepSpeed compiles its own way)",
    ),
    "zero nodes": ({"cluster.nodes": 0}, "cluster.nodes: Input should be greater than or equal to 1"),
}


@pytest.mark.parametrize("case", BROKEN, ids=list(BROKEN))
def test_broken_recipe_gives_one_line_naming_the_key(tmp_path: Path, case: str) -> None:
    mutate, expected = BROKEN[case]
    with pytest.raises(RecipeError) as error:
        load_recipe(_write(tmp_path, mutate))
    lines = str(error.value).splitlines()
    assert lines[0].endswith("1 problem(s):")
    assert len(lines) == 2
    assert lines[1].strip().startswith(expected)


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    path = _write(tmp_path, {"train.lr": -1, "train.optimizer": "sgd", "eval.bogus": 1})
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    message = str(error.value)
    assert "3 problem(s)" in message
    for key in ("train.lr", "train.optimizer", "eval.bogus"):
        assert f"  {key}:" in message


def test_file_and_override_mistakes(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_recipe(tmp_path / "list.yaml")
    with pytest.raises(RecipeError, match=r"must look like section\.key=value"):
        load_recipe(RECIPES / "smoke.yaml", ["train.lr"])
    with pytest.raises(RecipeError, match=r"train\.max_steps: Input should be greater than or equal to 1"):
        load_recipe(RECIPES / "smoke.yaml", ["train.max_steps=0"])


def test_paths_are_read_where_the_recipe_is_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`~`, `$VARIABLE`s and relative folders in data.dir, run.output_root and a local model.name_or_path are
    the submitting shell's, so the run's recipe.yaml names what every job reads; a hub name stays as it is;
    variables not set here, or each job's own, are named with the recipe's other problems."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SCRATCH", str(tmp_path / "scratch"))
    monkeypatch.chdir(tmp_path)
    here = Path.cwd()  # the real path, as the process sees it
    (tmp_path / "models" / "mine").mkdir(parents=True)
    recipe = load_recipe(RECIPES / "timit32.yaml", ["data.dir=${SCRATCH}/timit", "run.output_root=~/runs"])
    assert recipe.data.dir == f"{tmp_path}/scratch/timit"
    assert recipe.run.output_root == f"{tmp_path}/home/runs"
    assert recipe.model.name_or_path == "facebook/wav2vec2-base"
    relative = load_recipe(
        RECIPES / "timit32.yaml", ["data.dir=corpus/../timit", "model.name_or_path=models/mine"]
    )
    assert relative.data.dir == f"{here}/corpus/../timit"  # `..` is the file system's to resolve (symlinks)
    assert relative.model.name_or_path == f"{here}/models/mine"

    unset = ["data.dir=$NOT_SET_HERE/timit", "run.output_root=~/$NOR_THIS", "train.lr=-1"]
    with pytest.raises(RecipeError) as raised:
        load_recipe(RECIPES / "timit32.yaml", unset)
    problems = sorted(raised.value.problems)
    assert len(problems) == 3 and problems[0].startswith("data.dir: $NOT_SET_HERE is not set on ")
    assert problems[1].startswith("run.output_root: $NOR_THIS is not set on ")
    with pytest.raises(RecipeError, match=r"data.dir: \$SLURM_TMPDIR is each job's own"):
        load_recipe(RECIPES / "timit32.yaml", ["data.dir=$SLURM_TMPDIR/timit"])


def test_a_runs_own_recipe_is_read_as_it_was_resolved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run's recipe.yaml, read again by its jobs, requeues and resumes elsewhere, is not resolved again: a
    folder whose name holds a `$` stays, and a run from before paths were resolved keeps its relative one."""
    monkeypatch.setenv("SCRATCH", str(tmp_path / "a$b"))
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(RECIPES / "timit32.yaml", ["data.dir=$SCRATCH/timit"])
    assert recipe.data.dir == f"{tmp_path}/a$b/timit"
    stored = tmp_path / "recipe.yaml"
    stored.write_text(recipe.to_yaml())
    monkeypatch.chdir("/")
    assert load_run_recipe(stored) == recipe
    old = yaml.safe_load(stored.read_text())
    old["data"]["dir"] = "data/timit"
    stored.write_text(yaml.safe_dump(old))
    assert load_run_recipe(stored).data.dir == "data/timit"


def test_micro_batch_limit_above_global_batch_is_refused() -> None:
    with pytest.raises(RecipeError, match="max_micro_batch_size must not exceed"):
        load_recipe(RECIPES / "smoke.yaml", ["train.max_micro_batch_size=64"])


def test_readme_names_every_recipe_key() -> None:
    """The README's table of recipe keys is a second list of the schema: every key, and only those."""
    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        match = re.fullmatch(r"\| `(\w+)` \| (.*) \|", line)
        if match:
            without_values = re.sub(r"\([^)]*\)", "", match.group(2))  # `format` (`timit`, ...): values
            rows[match.group(1)] = set(re.findall(r"`(\w+)`", without_values))
    assert set(rows) == set(Recipe.model_fields)
    for name, field in Recipe.model_fields.items():
        section = field.annotation
        assert isinstance(section, type) and issubclass(section, BaseModel)
        assert rows[name] == set(section.model_fields), name
