"""The run's deliverables: results.{md,csv,json}, final/README.md (model card) and curves.png. No torch."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from asrlaunch.collect import HEADERS, MergedRun, ResultRow, format_value, render_table, result_json

DATASET = {"timit": "TIMIT_ASR - NA", "default": "GENERATED_TIMIT_LAYOUT - synthetic"}


def hyperparameters(meta: dict[str, Any]) -> list[tuple[str, Any]]:
    """The lines transformers' `extract_hyperparameters_from_trainer` (4.15, the reference card's version)
    writes for the same settings, in its order: per-device batch sizes, `distributed_type`/`num_devices`
    whenever a process group exists, totals only where they differ, its optimizer wording (the Trainer's
    AdamW printed as "Adam"), no warmup line for no warmup, "Native AMP" only for fp16 autocast (not under
    DeepSpeed)."""
    recipe, plan = meta["recipe"], meta["plan"]
    train = recipe["train"]
    world, micro, accum = plan["world_size"], plan["micro_batch"], plan["grad_accum"]
    eval_batch = recipe["eval"]["batch_size"]
    on_gpu = "cuda" in str(meta.get("device"))
    items: list[tuple[str, Any]] = [
        ("learning_rate", train["lr"]),
        ("train_batch_size", micro),
        ("eval_batch_size", eval_batch),
        ("seed", train["seed"]),
    ]
    backend = train.get("backend", "ddp")
    if world > 1 or backend == "deepspeed":
        items.append(("distributed_type", "multi-GPU"))  # the Trainer's words for any process group, CPU too
    if world > 1:
        items.append(("num_devices", world))
    if accum > 1:
        items.append(("gradient_accumulation_steps", accum))
    if micro * world * accum != micro:
        items.append(("total_train_batch_size", micro * world * accum))
    if eval_batch * world != eval_batch:
        items.append(("total_eval_batch_size", eval_batch * world))
    betas = train["adam_betas"]
    items.append(("optimizer", f"Adam with betas=({betas[0]},{betas[1]}) and epsilon={train['adam_eps']}"))
    items.append(("lr_scheduler_type", train["lr_scheduler"]))
    if train["warmup_steps"]:
        items.append(("lr_scheduler_warmup_steps", train["warmup_steps"]))
    items.append(
        ("training_steps", plan["total_steps"])
        if train.get("max_steps")
        else ("num_epochs", float(train["epochs"]))
    )
    if train["mixed_precision"] == "fp16" and on_gpu and backend == "ddp":
        items.append(("mixed_precision_training", "Native AMP"))
    return items


def run_facts(run: MergedRun) -> list[tuple[str, Any]]:
    """What the Trainer's card lacks: where and how long the run trained, across its attempts."""
    meta = run.meta[-1]
    spent = usage(run)
    return [
        ("nodes", meta.get("nodes", 1)),
        ("attempts", len(run.restarts) + 1),
        ("restarts (resumed from step)", ", ".join(map(str, run.restarts)) or "none"),
        ("wall_time_s", f"{spent['wall_time_s']:.0f}"),
        ("device_hours", f"{spent['device_hours']:.3f}"),
    ]


def _framework_versions(versions: dict[str, str]) -> str:
    names = {
        "transformers": "Transformers",
        "torch": "Pytorch",
        "datasets": "Datasets",
        "tokenizers": "Tokenizers",
        "accelerate": "Accelerate",
    }
    return "\n".join(f"- {names[k]} {versions[k]}" for k in names if k in versions)


def model_card(name: str, run: MergedRun, rows: Sequence[ResultRow]) -> str:
    """final/README.md in the layout of the reference card (Trainer-generated), plus run facts it lacks."""
    meta = run.meta[-1]
    recipe = meta["recipe"]
    base = (
        recipe["model"]["name_or_path"]
        if recipe["model"]["config"] is None
        else "a randomly initialised model"
    )
    base_link = f"[{base}](https://huggingface.co/{base})" if recipe["model"]["config"] is None else base
    dataset = DATASET["timit"] if recipe["data"].get("generate") is None else DATASET["default"]
    final = rows[-1] if rows else None
    results = (
        f"- Loss: {format_value(final.validation_loss)}\n- Wer: {format_value(final.wer)}"
        if final
        else "- no evaluation yet"
    )
    wer_result = (
        f"\n  - task: {{type: automatic-speech-recognition}}\n    metrics:\n"
        f"    - {{type: wer, value: {final.wer}}}"
        if final
        else " []"
    )
    params = "\n".join(f"- {key}: {value}" for key, value in [*hyperparameters(meta), *run_facts(run)])
    return f"""---
license: apache-2.0
tags:
- automatic-speech-recognition
- timit_asr
- generated_from_trainer
model-index:
- name: {name}
  results:{wer_result}
---

# {name}

This model is a fine-tuned version of {base_link} on the {dataset} dataset.
It achieves the following results on the evaluation set:
{results}

## Model description

wav2vec2 with a CTC head over a character vocabulary, trained with asrlaunch (global batch
{meta["plan"]["global_batch"]} on {meta["plan"]["world_size"]} process(es)).

## Intended uses & limitations

English speech recognition on read speech like the training corpus, 16 kHz audio; lower-case characters
without punctuation, greedy CTC decoding with no language model. Not evaluated on other domains.

## Training and evaluation data

Train {meta["plan"]["train_samples"]} utterances; evaluation at batch size 1 on the test split.

## Training procedure

### Training hyperparameters

The following hyperparameters were used during training:
{params}

### Training results

{render_table([r.values() for r in rows])}

### Framework versions

{_framework_versions(meta.get("versions", {}))}
"""


def usage(run: MergedRun) -> dict[str, float]:
    """Wall time of all attempts, and device hours (each attempt's world size x its wall time)."""
    return {"wall_time_s": run.wall_time_s, "device_hours": run.device_seconds / 3600}


def write_results(run_dir: Path, run: MergedRun, rows: Sequence[ResultRow]) -> None:
    (run_dir / "results.md").write_text(render_table([r.values() for r in rows]))
    with (run_dir / "results.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(HEADERS)
        writer.writerows(r.values() for r in rows)
    (run_dir / "results.json").write_text(json.dumps(result_json(run, rows), indent=1) + "\n")


def plot_curves(path: Path, runs: dict[str, MergedRun]) -> None:
    """Training loss, validation loss and WER against step; dotted lines where an attempt resumed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, wer_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for label, run in runs.items():
        prefix = f"{label}: " if len(runs) > 1 else ""
        loss_axis.plot(list(run.train), list(run.train.values()), label=f"{prefix}training loss")
        loss_axis.plot(
            list(run.evals),
            [e["eval_loss"] for e in run.evals.values()],
            "o-",
            markersize=3,
            label=f"{prefix}validation loss",
        )
        wer_axis.plot(
            list(run.evals), [e["wer"] for e in run.evals.values()], "o-", markersize=3, label=f"{prefix}WER"
        )
        for step in run.restarts:
            for axis in (loss_axis, wer_axis):
                axis.axvline(step, color="grey", linestyle=":", linewidth=1)
    if any(run.restarts for run in runs.values()):
        wer_axis.plot([], [], color="grey", linestyle=":", label="restart (resumed here)")
    loss_axis.set(xlabel="step", ylabel="loss", yscale="log", title="loss")
    wer_axis.set(xlabel="step", ylabel="WER", title="word error rate")
    for axis in (loss_axis, wer_axis):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
