"""The recipe: one YAML file that says everything a run needs, validated on load.

Launcher-side module: it must never import torch (``--dry-run`` answers in about a second).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from asrlaunch.core.paths import NEW_RUN, at_submission, checkpoint, expand_at_submission, resolved
from asrlaunch.core.validation import describe, fields_at

# Strings that end up in sbatch scripts or on command lines: no quotes, no `;`, no `$()`, no newlines.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
# The supervisor's time to see a hang (a poll) and take every rank's stacks before it ends the step.
SUPERVISOR_HEADROOM_S = 15


class RecipeError(ValueError):
    """A recipe (file or override) is wrong; the message names every offending key, one line each."""

    def __init__(self, message: str, problems: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems) or [message]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _check_safe(value: str | None, what: str) -> str | None:
    if value is not None and not SAFE_NAME.match(value):
        raise ValueError(
            f"{what} {value!r} must start with a letter or digit and hold only letters, digits and _ . + - "
            "(it is used in job scripts)"
        )
    return value


class RunSection(_Section):
    name: str = "run"
    output_root: str = "runs"

    @field_validator("name", mode="before")
    @classmethod
    def _name_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        _check_safe(value, "run name")
        return value

    _expanded_root = field_validator("output_root")(at_submission(expand_at_submission))

    @field_validator("output_root")
    @classmethod
    def _safe_root(cls, value: str) -> str:
        if not re.match(r"^[A-Za-z0-9_./+~-]+$", value):
            raise ValueError(
                f"output root {value!r} may only hold letters, digits and _ . / + ~ - "
                "(it appears in job scripts)"
            )
        return value


class ModelSection(_Section):
    # Hub name or local path of a pretrained checkpoint; ignored when `config` is given.
    name_or_path: str = "facebook/wav2vec2-base"
    # Wav2Vec2Config keyword arguments for a randomly initialised model (tests, smoke runs).
    config: dict[str, Any] | None = None
    # Extra Wav2Vec2Config keyword arguments applied on top of the pretrained config.
    overrides: dict[str, Any] = Field(default_factory=dict)
    freeze_feature_encoder: bool = True
    # An utterance too short for its transcript (fewer CTC frames than it needs) has an infinite loss: true
    # zeroes it (it adds nothing), false keeps it (the step's gradients are then not finite and the step is
    # skipped). The reference card's run had it off.
    ctc_zero_infinity: bool = True

    _local_checkpoint = field_validator("name_or_path")(at_submission(checkpoint))  # a hub name stays


class SynthSection(_Section):
    """How to generate a corpus when `data.dir` does not exist yet."""

    train: int = Field(400, ge=1)
    test: int = Field(100, ge=1)
    engine: Literal["auto", "tones", "espeak"] = "auto"  # auto: espeak where installed, else tones
    seed: int = 0
    layout: Literal["timit", "audiofolder", "disk"] = "timit"  # as data.format reads it
    sample_rate: int = Field(16000, ge=8000)  # other than 16 kHz: the loader resamples


class DataSection(_Section):
    dir: str
    # timit: TIMIT's LDC layout; audiofolder: audio files + metadata.csv (file_name, data.text_column), in
    # train/ and test/ or with a `split` column; disk: a DatasetDict saved with save_to_disk (see sources.py).
    format: Literal["timit", "audiofolder", "disk"] = "timit"
    text_column: str = "text"
    # Where the prepared table is cached; default ~/.cache/asrlaunch/prepared. `~` and `$VARIABLE`s are
    # expanded where the corpus is read: `$SLURM_TMPDIR/asr` is each node's own disk (data/prepare.py).
    cache_dir: str | None = None
    # Training-set size assumed by the launcher's plan before the data is read (TIMIT: 4620).
    expected_train_size: int | None = Field(None, ge=1)
    max_train_samples: int | None = Field(None, ge=1)
    max_eval_samples: int | None = Field(None, ge=1)
    # `reference`: the reference script's cleaning, final word delimiter and vocabulary order (its unescaped
    # regex also deletes apostrophes and digits); `clean`: keeps apostrophes and digits. See data/text.py.
    text_normalization: Literal["reference", "clean"] = "clean"
    # `grouped`: our order (length-sorted chunks of 50 global batches, batches shuffled, the last batch filled
    # by wrapping around); `reference`: the Trainer's length-grouped order of the reference card's run (its
    # megabatches, longest first, the epoch's last batch partial). Either is the same on every world size.
    order: Literal["grouped", "reference"] = "grouped"
    # The corpus's names of its training and evaluation splits (folders, `split` values, DatasetDict keys).
    train_split: str = "train"
    eval_split: str = "test"
    # Utterances that cannot be used (unreadable, empty or too-short audio, an empty transcript, ...) stop the
    # run with all of them listed; true leaves them out instead, counted in the logs and the model card.
    skip_bad: bool = False
    generate: SynthSection | None = None

    _dir_resolved = field_validator("dir")(at_submission(resolved))  # every job reads the folder submitted


class TrainSection(_Section):
    backend: Literal["ddp", "deepspeed"] = "ddp"
    # ZeRO stage of the deepspeed backend (optimizer state, then gradients, partitioned over ranks).
    zero_stage: Literal[1, 2] = 2
    global_batch_size: int = Field(32, ge=1)
    max_micro_batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-4, gt=0)
    optimizer: Literal["adamw", "adam"] = "adamw"
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    lr_scheduler: Literal["linear", "constant_with_warmup"] = "linear"
    warmup_steps: int = Field(0, ge=0)
    epochs: float = Field(1.0, gt=0)
    # Stop after this many optimizer steps; overrides `epochs` for the schedule's length too.
    max_steps: int | None = Field(None, ge=1)
    seed: int = 42
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    max_grad_norm: float | None = Field(1.0, gt=0)
    # Optimizer steps whose gradients are not finite are skipped; this many in a row end the run.
    max_consecutive_nonfinite: int = Field(20, ge=1)
    # TF32 matrix products on Ampere and later GPUs (fp32 work only; fp16/bf16 autocast is unaffected).
    allow_tf32: bool = True
    # torch.compile of the training model (dynamic shapes: every padded length shares one graph where it can).
    # Off until measured on a GPU: on a CPU it costs ~3 min of compilation for no faster steps. Compiled,
    # SpecAugment draws other masks than eager (same distribution): losses equal eager's only without it.
    compile: bool = False
    # How long a collective may wait for a peer before the process group gives up (NCCL's default; gloo's is
    # 30 min of every rank in the job waiting on one that is gone).
    collective_timeout_s: int = Field(600, ge=10)
    # The supervisor ends a step when a rank makes no progress for this long in a training step (or for ten
    # times its longest step so far, when that is more): a hang no collective sees. With several ranks, never
    # later than 15 s before collective_timeout_s: a peer's collective would fail first and take the blame.
    hang_timeout_s: int = Field(300, ge=10)
    # ... and from its process start to its first step (imports, corpus preparation, model download).
    startup_timeout_s: int = Field(1800, ge=10)

    @model_validator(mode="after")
    def _compile_with_ddp(self) -> TrainSection:
        if self.compile and self.backend == "deepspeed":
            raise ValueError("train.compile works with train.backend ddp (DeepSpeed compiles its own way)")
        return self

    @property
    def collective_deadline_s(self) -> int:
        """The supervisor's last moment to end a hang before a peer waiting for the hung rank times out."""
        return max(self.collective_timeout_s - SUPERVISOR_HEADROOM_S, self.collective_timeout_s // 2)

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        return "no" if value is False else value  # YAML reads an unquoted `no` as false

    @field_validator("adam_betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"each beta must be in [0, 1), got {list(betas)}")
        return betas


class EvalSection(_Section):
    steps: int = Field(100, ge=1)
    # The card's eval_batch_size: 1. `batched` evaluation gives the same results (see evaluate.py), faster.
    batch_size: Literal[1] = 1
    mode: Literal["batched", "sequential"] = "batched"
    # Padded audio per evaluation batch, in seconds (the longest utterance of a batch times its size).
    # On a CPU ~40 s is fastest (the conv stack's activations stay in cache); a GPU likes more.
    max_batch_seconds: float = Field(60.0, gt=0)
    # Also evaluate before the first step (gives the WER 1.0 baseline row).
    at_start: bool = False
    # The supervisor's budget between two evaluation batches.
    hang_timeout_s: int = Field(600, ge=10)


Tracker = Literal["tensorboard", "mlflow", "wandb", "none"]
DEFAULT_TRACKERS: tuple[Tracker, ...] = ("tensorboard",)


class LoggingSection(_Section):
    steps: int = Field(10, ge=1)
    # Experiment trackers (accelerate's): tensorboard, mlflow, wandb, or none; under <run_dir>/tracking/.
    report_to: list[Tracker] = Field(default_factory=lambda: list(DEFAULT_TRACKERS))
    # Log the sample ids of every step (tests of world-size invariance and exact resume).
    sample_ids: bool = False
    # Third-party output (library warnings, progress bars) goes to logs/debug-rank<R>.log; true: to the job's
    # output too.
    verbose: bool = False

    @property
    def trackers(self) -> list[str]:
        return [name for name in self.report_to if name != "none"]


class CheckpointSection(_Section):
    save_steps: int | None = Field(None, ge=1)
    keep_last: int = Field(2, ge=1)
    # A checkpoint that cannot be written (a full disk): `stop` the run with an error naming the folder and
    # the space needed, or `continue` training without it. Either way the partial folder is removed and the
    # older checkpoints stay.
    on_error: Literal["stop", "continue"] = "stop"
    # The supervisor's budget for one checkpoint write (and the final save). With several ranks, at most 15 s
    # less than train.collective_timeout_s: the other ranks wait for the write in a collective, which would
    # fail first. A file system that needs longer needs a longer train.collective_timeout_s.
    hang_timeout_s: int = Field(900, ge=10)


class ClusterSection(_Section):
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    # Processes per node on a CPU-only cluster (used when gpus_per_node is 0).
    processes_per_node: int = Field(1, ge=1)
    cpus_per_task: int = Field(1, ge=1)
    mem_gb: float | None = Field(None, gt=0)
    time_min: int = Field(60, ge=1)
    signal_delay_s: int = Field(60, ge=1)
    max_requeues: int = Field(5, ge=0)
    # A failed job (a rank or node lost, a hang, a crash: not a user error) is requeued this many times at
    # most, and never twice in a row at the same step.
    max_failures: int = Field(2, ge=0)
    # Before a requeue, a failed step is restarted inside the allocation the job holds, this many times per
    # job (not when a node of the job is down or drained).
    max_restarts_in_job: int = Field(2, ge=0)
    # A sweep's job array runs at most this many elements at once (`--array=0-N%K`); none: all.
    array_parallelism: int | None = Field(None, ge=1)
    # Prepare the corpus (decode, normalise, cache) and fetch the model as a CPU job on this partition first;
    # the training job waits for it (afterok). None: the training job's rank 0 prepares.
    prepare_partition: str | None = None
    prepare_cpus: int = Field(4, ge=1)
    prepare_time_min: int = Field(120, ge=1)
    extra_sbatch: dict[str, str] = Field(default_factory=dict)

    @field_validator("partition", "account", "qos", "prepare_partition")
    @classmethod
    def _safe_names(cls, value: str | None) -> str | None:
        return _check_safe(value, "value")

    @field_validator("constraint")
    @classmethod
    def _safe_constraint(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^[A-Za-z0-9_.&|\[\]*:-]+$", value):
            raise ValueError(f"constraint {value!r} may only hold letters, digits and _ . & | [ ] * : -")
        return value

    @field_validator("extra_sbatch")
    @classmethod
    def _safe_extra(cls, options: dict[str, str]) -> dict[str, str]:
        for key, value in options.items():
            _check_safe(key, "sbatch option")
            if not re.match(r"^[A-Za-z0-9_.,:=/@+-]*$", str(value)):
                raise ValueError(f"sbatch option {key}={value!r} holds characters that are not allowed")
        return options

    @property
    def tasks_per_node(self) -> int:
        return self.gpus_per_node if self.gpus_per_node > 0 else self.processes_per_node

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


class Recipe(_Section):
    run: RunSection = Field(default_factory=RunSection)
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    cluster: ClusterSection = Field(default_factory=ClusterSection)

    @model_validator(mode="after")
    def _micro_limit(self) -> Recipe:
        if self.train.max_micro_batch_size > self.train.global_batch_size:
            raise ValueError("train.max_micro_batch_size must not exceed train.global_batch_size")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def qualify_key(key: str) -> str:
    """`seed` -> `train.seed`: a bare key that names a field of exactly one section stands for it."""
    if "." in key or key in Recipe.model_fields:
        return key
    sections = [name for name in Recipe.model_fields if key in fields_at(Recipe, [name, key])]
    if len(sections) > 1:
        choices = ", ".join(f"{section}.{key}" for section in sections)
        raise RecipeError(f"{key!r} is a key of several sections: write one of {choices}")
    return f"{sections[0]}.{key}" if sections else key


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """`a.b=value` strings to a nested dict; values are parsed as YAML scalars (1e-4, true, [1, 2]).
    A bare key that belongs to one section only may leave the section out (`seed=1`)."""
    nested: dict[str, Any] = {}
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        try:
            if not sep or not key or any(not part for part in key.split(".")):
                raise RecipeError(f"override {item!r} must look like section.key=value (e.g. train.lr=3e-4)")
            *parents, leaf = qualify_key(key).split(".")
            target = nested
            for part in parents:
                target = target.setdefault(part, {})
                if not isinstance(target, dict):
                    raise RecipeError(f"override {item!r} conflicts with another override of {part!r}")
            target[leaf] = parse_value(raw)
        except RecipeError as problem:
            problems.append(str(problem))
    if problems:
        raise RecipeError("\n".join(problems), problems)
    return nested


def parse_value(raw: str) -> Any:
    """An override's value as YAML reads it (1e-4, true, [1, 2]); other text as it is (multi-line text too:
    YAML would drop everything after a `#` as a comment)."""
    try:
        return yaml.safe_load(raw) if raw.strip() and "\n" not in raw else raw
    except yaml.YAMLError:
        return raw


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def recipe_from_dict(raw: Mapping[str, Any], source: str = "<recipe>", new_run: bool = True) -> Recipe:
    """A recipe validated; for a new run its paths are read here (core/paths.py)."""
    try:
        return Recipe.model_validate(raw, context={NEW_RUN: new_run})
    except ValidationError as error:
        problems = [describe(Recipe, e) for e in error.errors()]
        lines = "\n".join(f"  {line}" for line in problems)
        raise RecipeError(f"{source}: {len(problems)} problem(s):\n{lines}", problems) from None


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    """The raw mapping of a recipe file, with a one-line error for a missing file or bad YAML."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except (OSError, UnicodeDecodeError) as error:  # a folder, unreadable, not text
        raise RecipeError(f"{path}: cannot be read ({error})") from None
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    return raw


def load_recipe(path: str | Path, overrides: Iterable[str] = ()) -> Recipe:
    """Read a recipe file, apply `key=value` overrides and validate everything, reporting all problems."""
    return recipe_from_dict(merge(read_recipe_file(path), parse_overrides(overrides)), str(path))


def load_run_recipe(path: str | Path) -> Recipe:
    """A run's own recipe.yaml as it was resolved at submission: its paths are not read again here (a run
    from before paths were resolved keeps its relative data.dir, as its earlier jobs read it)."""
    return recipe_from_dict(read_recipe_file(path), str(path), new_run=False)
