"""The model, the optimizer and the schedule, as the recipe says. Worker side (imports torch)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import Wav2Vec2Config, Wav2Vec2ForCTC, get_constant_schedule_with_warmup
from transformers import get_linear_schedule_with_warmup as linear_schedule

from asrlaunch.core.recipe import ModelSection, TrainSection
from asrlaunch.data.text import ctc_min_frames

__all__ = ["build_model", "build_optimizer", "build_scheduler", "ctc_min_frames"]


def _ctc_head(vocab: dict[str, int], pad_id: int) -> dict[str, Any]:
    # Mean over the batch of per-sample losses divided by target length, as in the reference recipe;
    # infinite losses (audio too short for its transcript) become zero instead of poisoning the step.
    return {
        "vocab_size": len(vocab),
        "pad_token_id": pad_id,
        "ctc_loss_reduction": "mean",
        "ctc_zero_infinity": True,
    }


def build_model(section: ModelSection, vocab: dict[str, int], pad_id: int) -> Wav2Vec2ForCTC:
    """A pretrained checkpoint with a fresh CTC head, or a random model from `section.config`."""
    head = _ctc_head(vocab, pad_id)
    if section.config is not None:
        model = Wav2Vec2ForCTC(Wav2Vec2Config(**{**section.config, **section.overrides, **head}))
    else:
        model = Wav2Vec2ForCTC.from_pretrained(section.name_or_path, **{**section.overrides, **head})
    if section.freeze_feature_encoder:
        model.freeze_feature_encoder()
    return model


def build_optimizer(
    model: torch.nn.Module, train: TrainSection, fused: bool = False
) -> torch.optim.Optimizer:
    """Biases and normalisation weights get no weight decay, as in the transformers Trainer. `fused`: one
    kernel for the whole update (CUDA), instead of several per parameter tensor."""
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for _, p in params if p.ndim >= 2], "weight_decay": train.weight_decay},
        {"params": [p for _, p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer_class = torch.optim.AdamW if train.optimizer == "adamw" else torch.optim.Adam
    extra = {"fused": True} if fused else {}
    return optimizer_class(groups, lr=train.lr, betas=train.adam_betas, eps=train.adam_eps, **extra)


def build_scheduler(
    optimizer: torch.optim.Optimizer, train: TrainSection, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    if train.lr_scheduler == "linear":
        return linear_schedule(optimizer, train.warmup_steps, total_steps)
    return get_constant_schedule_with_warmup(optimizer, train.warmup_steps)
