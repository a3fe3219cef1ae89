"""Padding efficiency of the run's global-batch sampler vs. random batches vs. the Trainer's sampler.

Efficiency = real frames / padded frames, every sample of a step counted at the length that step is padded
to: under data parallelism the slowest rank bounds the step, so that is what a GPU-hour buys.

    python bench/padding.py
"""

from __future__ import annotations

import numpy as np

from asrlaunch.data.sampler import epoch_batches, padding_efficiency

GLOBAL_BATCH, UTTERANCES, EPOCHS = 32, 4620, 3


def timit_like_lengths(seed: int = 0) -> np.ndarray:
    """TIMIT's training set: 4620 utterances of ~0.9-7.8 s, mean ~3.1 s, at 16 kHz."""
    rng = np.random.default_rng(seed)
    return (np.clip(rng.lognormal(np.log(3.0), 0.3, UTTERANCES), 0.9, 7.8) * 16000).astype(np.int64)


def ours(lengths: np.ndarray) -> float:
    steps = [b for epoch in range(EPOCHS) for b in epoch_batches(lengths, GLOBAL_BATCH, 42, epoch)]
    return padding_efficiency(lengths, steps)


def random_batches(lengths: np.ndarray) -> float:
    rng = np.random.default_rng(0)
    steps = [part for _ in range(EPOCHS) for part in np.array_split(rng.permutation(len(lengths)), 145)]
    return padding_efficiency(lengths, steps)


def trainer_ddp(lengths: np.ndarray, world: int) -> float | None:
    """transformers' LengthGroupedSampler as the Trainer uses it under DDP: per-device batches of 32/W,
    consecutive batches dealt to the ranks, each rank padding its own batch."""
    try:
        import torch
        from transformers.trainer_pt_utils import LengthGroupedSampler
    except ImportError:
        return None
    per_device = GLOBAL_BATCH // world
    steps = []
    for epoch in range(EPOCHS):
        generator = torch.Generator().manual_seed(epoch)
        order = list(LengthGroupedSampler(per_device, lengths=lengths.tolist(), generator=generator))
        steps += [order[i : i + GLOBAL_BATCH] for i in range(0, len(order) - GLOBAL_BATCH + 1, GLOBAL_BATCH)]
    return padding_efficiency(lengths, steps)


def main() -> None:
    lengths = timit_like_lengths()
    print(
        f"padding efficiency at global batch {GLOBAL_BATCH}, {UTTERANCES} TIMIT-like lengths, {EPOCHS} epochs"
    )
    print(
        f"{'world':>5} | {'ours (global batch padded as one)':>34} | {'random batches':>14} | "
        f"{'Trainer LengthGroupedSampler (DDP)':>34}"
    )
    random_eff = random_batches(lengths)
    for world in (1, 2, 4, 8):
        trainer = trainer_ddp(lengths, world)
        shown = f"{trainer:.3f}" if trainer is not None else "n/a (no torch)"
        print(f"{world:>5} | {ours(lengths):>34.3f} | {random_eff:>14.3f} | {shown:>34}")


if __name__ == "__main__":
    main()
