"""Worker-side set-up shared by the trainer: accelerator, corpus, batches, versions. Imports torch lazily."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from asrlaunch.recipe import Recipe


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "asrlaunch" / "prepared"


@dataclass
class Batch:
    input_values: Any
    labels: Any


def collate(rows: Any, indices: np.ndarray, pad_to: int) -> Batch:
    """Zero-pad audio to `pad_to` (the global batch's longest sample) and labels with -100."""
    import torch

    picked = rows[indices.tolist()]
    audio = torch.zeros(len(indices), pad_to)
    label_width = max(len(labels) for labels in picked["labels"])
    labels = torch.full((len(indices), label_width), -100, dtype=torch.long)
    for i, (values, tokens) in enumerate(zip(picked["input_values"], picked["labels"], strict=True)):
        audio[i, : len(values)] = torch.tensor(values)
        labels[i, : len(tokens)] = torch.as_tensor(tokens, dtype=torch.long)
    return Batch(audio, labels)


def versions() -> dict[str, str]:
    import accelerate
    import datasets
    import torch
    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "accelerate": accelerate.__version__,
    }


def ensure_corpus(recipe: Recipe, is_main: bool) -> None:
    """Generate the smoke corpus on first use when the recipe asks for it and `data.dir` is missing."""
    from asrlaunch.data.synth import generate_corpus

    data_dir, spec = Path(recipe.data.dir), recipe.data.generate
    if spec is not None and is_main and not data_dir.exists():
        print(f"generating a {spec.engine} corpus in {data_dir} ({spec.train} train, {spec.test} test)")
        generate_corpus(data_dir, spec.train, spec.test, engine=spec.engine, seed=spec.seed)


def make_accelerator(recipe: Recipe, world_size: int, grad_accum: int) -> Any:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, GradientAccumulationPlugin

    on_cpu = not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=on_cpu,
        mixed_precision="no" if on_cpu else recipe.train.mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=grad_accum, sync_with_dataloader=False
        ),
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=_needs_unused(recipe))],
    )
    if accelerator.num_processes != world_size:
        raise RuntimeError(
            f"WORLD_SIZE says {world_size} processes but accelerate formed a world of "
            f"{accelerator.num_processes}: launch with torchrun/srun, not `accelerate launch --cpu`"
        )
    return accelerator


def _needs_unused(recipe: Recipe) -> bool:
    # layerdrop skips whole layers, so DDP must not wait for their gradients.
    settings = {**(recipe.model.config or {}), **recipe.model.overrides}
    return float(settings.get("layerdrop", 0.0)) > 0
