"""Checks on the submitting machine before anything is queued (about a second, no torch): the data, the
model, the engine's and the trackers' packages (the job runs this Python), and whether the job's shape fits a
node of its partition. Each problem is one
line naming the recipe key to change; `submit.py --no-preflight` skips them (data seen only by compute nodes).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from asrlaunch.core.model_keys import CONFIG_CLASS, keys_in_source, transformers_version, unknown_key_lines
from asrlaunch.core.recipe import Recipe
from asrlaunch.job.scheduler import SIGNAL_RESOLUTION_S, run_command

SINFO_FORMAT = "%N|%P|%c|%m|%G|%l"
# tracker -> (the module it needs, the pyproject extra that installs it)
TRACKER_PACKAGES = {
    "tensorboard": ("tensorboard", "train"),
    "mlflow": ("mlflow", "mlflow"),
    "wandb": ("wandb", "wandb"),
}


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    message: str
    checked: bool = True  # False: this machine cannot tell (a package the check reads is not installed here)

    def line(self) -> str:
        verdict = "FAIL" if not self.ok else "ok" if self.checked else "skip"
        return f"{verdict:>4}  {self.name}: {self.message}"


def extra_packages(extra: str) -> list[str]:
    """The distributions `pip install 'asrlaunch[EXTRA]'` adds: pyproject's list, read from the installed
    metadata."""
    found = []
    for spec in importlib.metadata.requires("asrlaunch") or []:
        requirement, _, marker = spec.partition(";")
        if re.search(rf"extra\s*==\s*['\"]{extra}['\"]", marker):
            found.append(re.split(r"[<>=!~\[ (]", requirement.strip())[0])
    return found


def installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def check_engine(recipe: Recipe) -> Check:
    """The job's tasks run this Python (submitit starts them with it): the engine's packages must be here."""
    extras = ["train", *(["deepspeed"] if recipe.train.backend == "deepspeed" else [])]
    if not installed("asrlaunch"):  # run from a source tree: no metadata lists the extras
        return Check("engine", True, "not checked, asrlaunch is not installed (pip install -e .)", False)
    missing = {extra: [d for d in extra_packages(extra) if not installed(d)] for extra in extras}
    lines = [
        f"the job runs {sys.executable}, which lacks {', '.join(names)}: pip install 'asrlaunch[{extra}]'"
        for extra, names in missing.items()
        if names
    ]
    return Check("engine", not lines, "; ".join(lines) or f"{sys.executable} has [{','.join(extras)}]")


def check_data(recipe: Recipe) -> Check:
    from asrlaunch.data.prepare import job_local_variables
    from asrlaunch.data.sources import DataError, cheap_problems, count_utterances

    data = recipe.data
    root = Path(data.dir)
    if not root.exists() and data.generate is not None:
        return Check(
            "data", True, f"{root} does not exist yet: the job generates it ({data.generate.engine})"
        )
    try:
        counts = count_utterances(data)
        problems = cheap_problems(data)
    except DataError as error:
        return Check("data", False, f"data.dir: {error}")
    except ModuleNotFoundError as error:  # reading the audio needs the [train] extra: check_engine names it
        missing = f"{root} ({data.format}): not checked, {error.name} is not installed"
        return Check("data", True, missing, checked=False)
    expected = data.expected_train_size
    note = "" if expected in (None, counts["train"]) else f"; data.expected_train_size says {expected}"
    if problems:
        shown = "; ".join(p.line() for p in problems[:3]) + ("; ..." if len(problems) > 3 else "")
        if not data.skip_bad:
            return Check(
                "data",
                False,
                f"data.dir: {len(problems)} bad utterance(s): {shown}; fix them, or set "
                "data.skip_bad=true to leave them out (the job lists every one)",
            )
        note += f"; {len(problems)} bad utterance(s) will be left out (data.skip_bad)"
    if job_own := job_local_variables(recipe):
        names = ", ".join(f"${name}" for name in job_own)
        note += f"; data.cache_dir names {names} (a job's own, or unset here): the job prepares the corpus"
        note += " on each node"
    return Check(
        "data", True, f"{root} ({data.format}): {counts['train']} train / {counts['test']} test{note}"
    )


def check_model(recipe: Recipe) -> Check:
    model = recipe.model
    if model.config is not None:
        return Check("model", True, "built from model.config (random init)")
    path = Path(model.name_or_path)
    if path.exists():
        ok = (path / "config.json").exists()
        return Check("model", ok, f"{path}" + ("" if ok else ": no config.json (model.name_or_path)"))
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError

    try:
        cached = try_to_load_from_cache(model.name_or_path, "config.json")
    except HFValidationError:
        return Check(
            "model",
            False,
            f"model.name_or_path: {model.name_or_path} is neither a folder here nor a hub id "
            "(owner/name, e.g. facebook/wav2vec2-base)",
        )
    if isinstance(cached, str):
        return Check("model", True, f"{model.name_or_path} is in the Hugging Face cache")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        name = model.name_or_path
        return Check(
            "model",
            False,
            f"model.name_or_path: {name} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
            f"fetch it where the hub is reachable (`huggingface-cli download {name}`, same HF_HOME), "
            "or point model.name_or_path at a local copy",
        )
    return Check("model", True, f"{model.name_or_path} is not cached: the job downloads it from the hub")


def check_model_keys(recipe: Recipe) -> Check:
    """`model.config` and `model.overrides` against Wav2Vec2Config's keys, read from transformers' source."""
    model = recipe.model
    sections = {"model.config": model.config or {}, "model.overrides": model.overrides}
    count = sum(len(values) for values in sections.values())
    version = transformers_version()
    if version is None:
        return Check("model keys", True, "not checked, transformers is not installed here", False)
    if (known := keys_in_source()) is None:
        missing = f"not checked, transformers {version}'s source has no {CONFIG_CLASS} where it had"
        return Check("model keys", True, missing, False)
    problems = unknown_key_lines(sections, known.__contains__)
    verdict = "; ".join(problems) or f"{count} key(s) of {CONFIG_CLASS} (transformers {version})"
    return Check("model keys", not problems, verdict)


def missing_packages(recipe: Recipe) -> list[str]:
    """One line per tracker whose package is not installed, naming the extra to install."""
    lines = []
    for name in recipe.logging.trackers:
        module, extra = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            lines.append(
                f"logging.report_to: {name} needs the {module} package: pip install 'asrlaunch[{extra}]' "
                "(or drop it from logging.report_to)"
            )
    return lines


def check_trackers(recipe: Recipe) -> Check:
    missing = missing_packages(recipe)
    return Check("trackers", not missing, "; ".join(missing) or ", ".join(recipe.logging.report_to))


@dataclass(frozen=True)
class Node:
    name: str
    partitions: frozenset[str]
    default_partition: str
    cpus: int
    memory_mb: int
    gpus: int
    max_time: str


def parse_sinfo_nodes(text: str) -> list[Node]:
    """`sinfo -h -N -o '%N|%P|%c|%m|%G|%l'` (one line per node and partition; `*` marks the default)."""
    rows: dict[str, dict] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 6:
            continue
        name, partition, cpus, memory, gres, limit = parts[:6]
        gpus = sum(int(g.split("(")[0].split(":")[-1]) for g in gres.split(",") if g.startswith("gpu"))
        row = rows.setdefault(
            name,
            {
                "partitions": set(),
                "default": "",
                "cpus": int(cpus.rstrip("+")),
                "memory": int(memory.rstrip("+")),
                "gpus": gpus,
                "limit": limit,
            },
        )
        row["partitions"].add(partition.rstrip("*"))
        if partition.endswith("*"):
            row["default"] = partition.rstrip("*")
    return [
        Node(name, frozenset(r["partitions"]), r["default"], r["cpus"], r["memory"], r["gpus"], r["limit"])
        for name, r in rows.items()
    ]


def limit_minutes(text: str) -> float | None:
    """sinfo's time limit (`infinite`, `1-00:00:00`, `4:00:00`, `30:00`) in minutes; None when unlimited."""
    if text in ("infinite", "UNLIMITED", "n/a", ""):
        return None
    days, _, clock = text.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    return int(days or 0) * 1440 + parts[0] * 60 + parts[1] + parts[2] / 60


def check_shape(recipe: Recipe, nodes: list[Node]) -> Check:
    """Does the job fit: enough nodes of its partition with the CPUs, memory and GPUs one node must give?"""
    cluster = recipe.cluster
    partition = cluster.partition or next((n.default_partition for n in nodes if n.default_partition), "")
    members = [n for n in nodes if partition in n.partitions]
    if not members:
        known = sorted({p for n in nodes for p in n.partitions})
        return Check(
            "shape", False, f"cluster.partition: no partition {partition!r} (there are: {', '.join(known)})"
        )
    cpus = cluster.cpus_per_task * cluster.tasks_per_node
    memory = int(cluster.mem_gb * 1024) if cluster.mem_gb else 0
    fit = [n for n in members if n.cpus >= cpus and n.memory_mb >= memory and n.gpus >= cluster.gpus_per_node]
    big = max(members, key=lambda n: (n.cpus, n.memory_mb, n.gpus))
    size = f"{big.cpus} CPUs, {big.memory_mb} MB, {big.gpus} GPUs"
    largest = f"the largest node of {partition} ({big.name}) has {size}"
    if len(fit) < cluster.nodes:
        wanted = (
            f"{cluster.nodes} node(s) with {cpus} CPUs (cluster.cpus_per_task={cluster.cpus_per_task} x "
            f"{cluster.tasks_per_node} tasks), {memory} MB (cluster.mem_gb) and {cluster.gpus_per_node} GPUs "
            "(cluster.gpus_per_node)"
        )
        return Check("shape", False, f"the job needs {wanted}; {len(fit)} of {partition} qualify: {largest}")
    limit = limit_minutes(big.max_time)
    if limit is not None and cluster.time_min > limit:
        return Check(
            "shape",
            False,
            f"cluster.time_min={cluster.time_min} exceeds {partition}'s limit of {limit:.0f} min",
        )
    return Check(
        "shape",
        True,
        f"{cluster.nodes} x ({cpus} CPUs, {memory} MB, {cluster.gpus_per_node} GPUs) fits {partition}",
    )


def check_stop_signal(recipe: Recipe, executor: str) -> Check:
    """The stop signal comes `signal_delay_s` before the time limit, and under SLURM up to a minute earlier
    still: a job whose limit is not longer than that could be told to stop as it starts, and would only ever
    checkpoint and requeue."""
    cluster = recipe.cluster
    earliest = cluster.signal_delay_s + (SIGNAL_RESOLUTION_S if executor == "slurm" else 0)
    if cluster.time_min * 60 > earliest:
        return Check("time", True, f"the stop signal comes {earliest} s or less before the time limit")
    return Check(
        "time",
        False,
        f"cluster.time_min={cluster.time_min} is too short for "
        f"cluster.signal_delay_s={cluster.signal_delay_s}: the stop signal may come {earliest} s before "
        "the time limit"
        + (f" (SLURM sends it up to {SIGNAL_RESOLUTION_S} s early)" if executor == "slurm" else "")
        + f", i.e. as the job starts; set cluster.time_min above {earliest // 60} or a shorter delay",
    )


def preflight(recipe: Recipe, executor: str) -> list[Check]:
    checks = [check_engine(recipe), check_data(recipe), check_model(recipe), check_model_keys(recipe)]
    checks += [check_trackers(recipe), check_stop_signal(recipe, executor)]
    if executor == "slurm":
        nodes = parse_sinfo_nodes(run_command(["sinfo", "-h", "-N", "-o", SINFO_FORMAT]) or "")
        checks.append(check_shape(recipe, nodes) if nodes else Check("shape", False, "sinfo listed no nodes"))
    return checks
