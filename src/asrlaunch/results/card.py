"""The model card's text (final/README.md) in the layout of the reference card. Pure: report.py writes it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from asrlaunch.core.goodput import clock, goodput, stop_history
from asrlaunch.results.merge import MergedRun, RunResult
from asrlaunch.results.table import format_value, render_table

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
    """What the Trainer's card lacks: where and how long the run trained, across its attempts. Wall time is
    summed over attempts (first to last record of each, queue time excluded); device hours weigh each
    attempt's wall time by its world size."""
    stops = [
        f"{kind} at step {step} ({clock(cost)} lost)" for _, kind, step, cost in stop_history(run.history)
    ]
    return [
        ("nodes", run.meta[-1].get("nodes", 1)),
        ("attempts", len(run.restarts) + 1),
        ("restarts (resumed from step)", ", ".join(map(str, run.restarts)) or "none"),
        ("stops", "; ".join(stops) or "none"),
        ("wall_time_s", f"{run.wall_time_s:.0f}"),
        ("device_hours", f"{run.device_seconds / 3600:.3f}"),
        ("goodput", goodput(run.history).summary()),
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


def evaluation(recipe: dict[str, Any]) -> str:
    if recipe["eval"].get("mode", "sequential") == "batched":
        return "batched with results equal to batch size 1 (exact padding: masked group norm, attention mask)"
    return "at batch size 1"


def data_line(meta: dict[str, Any], recipe: dict[str, Any]) -> str:
    """`Train N utterances; evaluation on the test split, ...`, with the bad utterances left out, if any."""
    count = meta.get("skipped_utterances") or 0
    skipped = f" ({count} bad utterances left out: data.skip_bad)" if count else ""
    train = meta["plan"]["train_samples"]
    return f"Train {train} utterances{skipped}; evaluation on the test split, {evaluation(recipe)}."


def dataset_name(data: dict[str, Any]) -> str:
    """As the card names the corpus: TIMIT by its hub name, a generated one as such, anyone else's by its
    folder and format."""
    if data.get("generate") is not None:
        return DATASET["default"]
    if data.get("format", "timit") == "timit":
        return DATASET["timit"]
    return f"{Path(str(data['dir'])).name} ({data['format']})"


def model_card(result: RunResult) -> str:
    """final/README.md in the layout of the reference card (Trainer-generated), plus run facts it lacks."""
    run, rows = result.run, result.rows
    meta = run.meta[-1]
    recipe = meta["recipe"]
    base = (
        recipe["model"]["name_or_path"]
        if recipe["model"]["config"] is None
        else "a randomly initialised model"
    )
    base_link = f"[{base}](https://huggingface.co/{base})" if recipe["model"]["config"] is None else base
    dataset = dataset_name(recipe["data"])
    tags = "\n- timit_asr" if dataset == DATASET["timit"] else ""
    final = result.final
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
- automatic-speech-recognition{tags}
- generated_from_trainer
model-index:
- name: {result.name}
  results:{wer_result}
---

# {result.name}

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

{data_line(meta, recipe)}

## Training procedure

### Training hyperparameters

The following hyperparameters were used during training:
{params}

### Training results

{render_table([r.values() for r in rows])}

### Framework versions

{_framework_versions(meta.get("versions", {}))}
"""
