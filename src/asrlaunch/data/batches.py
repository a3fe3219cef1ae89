"""One rank's training data: the prepared corpus, the run's global order, and collated micro-batches.

No DataLoader: audio was decoded once into the Arrow cache, so a step's micro-batches are collated directly
(this also avoids the global-RNG draw a DataLoader iterator makes, which would break exact resume).
Worker side: imports torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from asrlaunch.data.sampler import GlobalOrder
from asrlaunch.data.timit import PreparedCorpus, load_corpus
from asrlaunch.plan import BatchPlan
from asrlaunch.recipe import Recipe


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "asrlaunch" / "prepared"


@dataclass
class Batch:
    input_values: torch.Tensor
    labels: torch.Tensor


def collate(rows: Any, indices: np.ndarray, pad_to: int) -> Batch:
    """Zero-pad audio to `pad_to` (the global batch's longest sample) and labels with -100."""
    picked = rows[indices.tolist()]
    audio = torch.zeros(len(indices), pad_to)
    label_width = max(len(labels) for labels in picked["labels"])
    labels = torch.full((len(indices), label_width), -100, dtype=torch.long)
    for i, (values, tokens) in enumerate(zip(picked["input_values"], picked["labels"], strict=True)):
        audio[i, : len(values)] = torch.as_tensor(values)
        labels[i, : len(tokens)] = torch.as_tensor(tokens, dtype=torch.long)
    return Batch(audio, labels)


def ensure_corpus(recipe: Recipe, is_main: bool) -> None:
    """Generate the smoke corpus on first use when the recipe asks for it and `data.dir` is missing."""
    from asrlaunch.data.synth import generate_corpus, resolve_engine

    data_dir, spec = Path(recipe.data.dir), recipe.data.generate
    if spec is not None and is_main and not data_dir.exists():
        engine = resolve_engine(spec.engine)
        print(f"generating a {engine} corpus in {data_dir} ({spec.train} train, {spec.test} test)", flush=True)
        generate_corpus(data_dir, spec.train, spec.test, engine=engine, seed=spec.seed)


def prepare_corpus(recipe: Recipe) -> PreparedCorpus:
    data = recipe.data
    return load_corpus(
        data.dir,
        data.cache_dir or default_cache_dir(),
        data.max_train_samples,
        data.max_eval_samples,
        data.text_normalization,
    )


class TrainData:
    """The training split as this rank reads it: rows, ids, label lengths and the run's global order."""

    def __init__(self, corpus: PreparedCorpus, global_batch: int, seed: int) -> None:
        from asrlaunch.model import ctc_min_frames

        train = corpus.train
        self.corpus = corpus
        self.rows = train.with_format("numpy", columns=["input_values", "labels"])
        self.ids = list(train["id"])
        self.ctc_min_frames = np.array([ctc_min_frames(labels) for labels in train["labels"]])
        self.order = GlobalOrder(np.asarray(train["length"]), global_batch, seed)

    def __len__(self) -> int:
        return len(self.ids)

    def micro_batches(self, step: int, plan: BatchPlan, rank: int) -> list[Batch]:
        """This rank's micro-batches of global step `step`, every one padded to the step's longest sample."""
        from asrlaunch.data.sampler import rank_micro_batches

        batch, pad_to = self.order.batch(step), self.order.pad_length(step)
        return [collate(self.rows, indices, pad_to) for indices in rank_micro_batches(batch, plan, rank)]
