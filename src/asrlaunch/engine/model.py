"""The model, the optimizer and the schedule, as the recipe says. Worker side (imports torch)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import Wav2Vec2Config, Wav2Vec2ForCTC, get_constant_schedule_with_warmup
from transformers import get_linear_schedule_with_warmup as linear_schedule

from asrlaunch.core.model_keys import unknown_key_lines
from asrlaunch.core.recipe import ModelSection, RecipeError, TrainSection
from asrlaunch.data.text import ctc_min_frames

__all__ = ["build_model", "build_optimizer", "build_scheduler", "ctc_min_frames"]


def _ctc_head(section: ModelSection, vocab_size: int, pad_id: int) -> dict[str, Any]:
    # Mean over the batch of per-sample losses divided by target length, as in the reference recipe.
    return {
        "vocab_size": vocab_size,
        "pad_token_id": pad_id,
        "ctc_loss_reduction": "mean",
        "ctc_zero_infinity": section.ctc_zero_infinity,
    }


def build_model(section: ModelSection, vocab_size: int, pad_id: int) -> Wav2Vec2ForCTC:
    """A pretrained checkpoint with a fresh CTC head of `vocab_size` outputs (the tokenizer's length, its
    added `<s>` and `</s>` included, as the reference script sized it), or a random model from
    `section.config`."""
    head = _ctc_head(section, vocab_size, pad_id)
    refuse_unknown_keys({"model.config": section.config or {}, "model.overrides": section.overrides})
    if section.config is not None:
        model = Wav2Vec2ForCTC(Wav2Vec2Config(**{**section.config, **section.overrides, **head}))
    else:
        # As the reference script: the config first, updated, then the model. The hub's wav2vec2-base config
        # says `gradient_checkpointing: true`, which transformers turns into activation checkpointing (every
        # layer's forward computed twice); the script overwrote it with the Trainer's default, false.
        config = Wav2Vec2Config.from_pretrained(section.name_or_path)
        config.update({**section.overrides, **head, "gradient_checkpointing": False})
        model = pretrained(section.name_or_path, config)
    if section.freeze_feature_encoder:
        model.freeze_feature_encoder()
    else:
        skip_audio_gradient(model)
    return model


def pretrained(name_or_path: str, config: Wav2Vec2Config) -> Wav2Vec2ForCTC:
    """The checkpoint's weights. A checkpoint fine-tuned with CTC on another vocabulary (another run's
    `final/`, a hub model such as wav2vec2-base-960h) gets a fresh head of this corpus's size; any other
    weight whose shape the recipe's overrides change is an error, not a silent re-initialisation."""
    loaded: Any = Wav2Vec2ForCTC.from_pretrained(
        name_or_path, config=config, ignore_mismatched_sizes=True, output_loading_info=True
    )
    model, loading = loaded
    mismatched = {key: (tuple(old), tuple(new)) for key, old, new in loading["mismatched_keys"]}
    others = sorted(key for key in mismatched if not key.startswith("lm_head."))
    if others:
        shapes = "; ".join(f"{key}: {mismatched[key][0]} -> {mismatched[key][1]}" for key in others)
        raise RecipeError(
            f"model.overrides change the shape of {name_or_path}'s weights ({shapes}): they would be "
            "initialised anew; leave out the overrides that change the architecture"
        )
    if mismatched:
        print(
            f"model: {name_or_path}'s CTC head is for another vocabulary; a fresh head of "
            f"{config.vocab_size} outputs (this corpus's) is trained",
            flush=True,
        )
    return model


def refuse_unknown_keys(sections: dict[str, dict[str, Any]]) -> None:
    """RecipeError for keys Wav2Vec2Config does not have (core/model_keys.py: why, and the dry run's check).
    The class's own keys, not a checkpoint's: transformers keeps every key of a `config.json` as an attribute,
    ones that nothing reads any more included, so a checkpoint's config would let those through."""
    config = Wav2Vec2Config()
    problems = unknown_key_lines(sections, lambda key: is_setting(config, key))
    if problems:
        raise RecipeError("\n".join(problems))


def is_setting(config: Wav2Vec2Config, key: str) -> bool:
    """A value the config holds, or a property it can set: not a method, not a getter alone."""
    attribute = inspect.getattr_static(type(config), key, None)
    if isinstance(attribute, property):
        return attribute.fset is not None
    return hasattr(config, key) and not callable(getattr(config, key))


def skip_audio_gradient(model: Wav2Vec2ForCTC) -> None:
    """A trainable feature encoder marks the raw audio as needing a gradient (for activation checkpointing,
    which the engine never enables): the first convolution then computes that gradient and throws it away,
    ~10-25% of a CPU step of a small model. Its weights still get their gradients, bitwise the same."""
    encoder = model.wav2vec2.feature_extractor
    if hasattr(encoder, "_requires_grad"):  # transformers' private flag: where it is gone, nothing to skip
        encoder._requires_grad = False


def build_optimizer(
    model: torch.nn.Module, train: TrainSection, fused: bool = False
) -> torch.optim.Optimizer:
    """The Trainer's (4.15) two groups: weight decay on every parameter except biases and LayerNorm
    parameters. `fused`: one kernel for the whole update (CUDA), instead of several per parameter tensor."""
    in_layer_norm = {
        f"{module_name}.{name}" if module_name else name
        for module_name, module in model.named_modules()
        if isinstance(module, torch.nn.LayerNorm)
        for name, _ in module.named_parameters(recurse=False)
    }
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    decays = [name not in in_layer_norm and "bias" not in name for name, _ in params]
    groups = [
        {
            "params": [p for (_, p), d in zip(params, decays, strict=True) if d],
            "weight_decay": train.weight_decay,
        },
        {"params": [p for (_, p), d in zip(params, decays, strict=True) if not d], "weight_decay": 0.0},
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
