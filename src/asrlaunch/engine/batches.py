"""One rank's training data: the prepared corpus (data/prepare.py), the run's global order, and collated
micro-batches.

No DataLoader: audio was decoded once into the Arrow cache, so a step's micro-batches are collated directly
(this also avoids the global-RNG draw a DataLoader iterator makes, which would break exact resume).
Worker side: imports torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from asrlaunch.core.plan import BatchPlan
from asrlaunch.data.corpus import PreparedCorpus
from asrlaunch.data.sampler import GlobalOrder
from asrlaunch.data.table import Table
from asrlaunch.data.text import ctc_min_frames


@dataclass
class Batch:
    input_values: torch.Tensor
    labels: torch.Tensor
    # The micro-batch's loss times this is its share of the step's mean over the global batch's samples: 1
    # for a full global batch; in a partial one (samples here x micro-batches per step / samples in the
    # batch); 0 for a stand-in that only keeps this rank in the step's collectives (it has no samples).
    weight: float = 1.0

    def pinned(self) -> Batch:
        """In page-locked memory, so the copy to the GPU can run while the host goes on."""
        return Batch(self.input_values.pin_memory(), self.labels.pin_memory(), self.weight)


def pad_rows(
    values: Sequence[np.ndarray], targets: Sequence[np.ndarray], pad_to: int
) -> tuple[np.ndarray, np.ndarray]:
    """Audio zero-padded to `pad_to` samples and labels padded with -100 to the longest: one copy of each
    read-only Arrow row."""
    audio = np.zeros((len(values), pad_to), dtype=np.float32)
    labels = np.full((len(values), max(len(t) for t in targets)), -100, dtype=np.int64)
    for i, (value, target) in enumerate(zip(values, targets, strict=True)):
        audio[i, : len(value)] = value
        labels[i, : len(target)] = target
    return audio, labels


def collate(table: Table, indices: np.ndarray, pad_to: int) -> Batch:
    """Zero-pad audio to `pad_to` (the global batch's longest sample) and labels with -100."""
    picked = table.rows(indices.tolist(), ("input_values", "labels"))
    audio, labels = pad_rows(picked["input_values"], picked["labels"], pad_to)
    return Batch(torch.from_numpy(audio), torch.from_numpy(labels))


class TrainData:
    """The training split as this rank reads it: rows, ids, label lengths and the run's global order."""

    def __init__(self, corpus: PreparedCorpus, global_batch: int, seed: int, order: str = "grouped") -> None:
        train = corpus.train
        self.corpus = corpus
        self.rows = train
        self.ids = train.column("id")
        self.ctc_min_frames = np.array([ctc_min_frames(labels.tolist()) for labels in train.arrays("labels")])
        self.order = GlobalOrder(train.numbers("length"), global_batch, seed, order)

    def __len__(self) -> int:
        return len(self.ids)

    def micro_batches(self, step: int, plan: BatchPlan, rank: int) -> list[Batch]:
        """This rank's micro-batches of global step `step`, every one padded to the step's longest sample."""
        from asrlaunch.data.sampler import rank_micro_batches

        batch, pad_to = self.order.batch(step), self.order.pad_length(step)
        parts = rank_micro_batches(batch, plan, rank)
        if len(batch) == plan.global_batch:
            return [collate(self.rows, indices, pad_to) for indices in parts]
        slots = plan.world_size * plan.grad_accum  # a partial batch: each micro-batch weighted by its samples
        return [
            dataclasses.replace(
                collate(self.rows, indices if len(indices) else batch[:1], pad_to),
                weight=len(indices) * slots / len(batch),
            )
            for indices in parts
        ]


class Prefetcher:
    """Collates the next step's micro-batches on a background thread while the GPU computes this one.

    Collation draws no random numbers, so it may run ahead without touching exact resume. A new batch plan
    (an out-of-memory split) drops what was collated for the old one. On a CPU the "device" is the host
    itself: there a second thread only competes with the computation for cores (and the GIL), so collation
    stays inline (`background=False`).
    """

    def __init__(self, data: TrainData, plan: BatchPlan, rank: int, background: bool) -> None:
        self.data, self.plan, self.rank, self.background = data, plan, rank, background
        self.pin_memory = background
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="collate")
        self._ahead: tuple[int, BatchPlan, Future[list[Batch]]] | None = None

    def _collate(self, step: int, plan: BatchPlan) -> list[Batch]:
        batches = self.data.micro_batches(step, plan, self.rank)
        return [batch.pinned() for batch in batches] if self.pin_memory else batches

    def get(self, step: int, next_step: int | None) -> list[Batch]:
        """Step `step`'s micro-batches (collated ahead when it was foreseen); starts on `next_step`'s."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == step and ahead[1] == self.plan:
            batches = ahead[2].result()
        else:
            batches = self._collate(step, self.plan)
        if next_step is not None and self.background:
            self._ahead = (next_step, self.plan, self._pool.submit(self._collate, next_step, self.plan))
        return batches

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
