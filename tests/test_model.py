"""The model as the engine builds it: what it changes in a stock Wav2Vec2ForCTC, and what it must not."""

from __future__ import annotations

from typing import Any

import torch

from asrlaunch.core.recipe import ModelSection
from asrlaunch.engine.model import build_model

from .test_evaluate import GROUP_NORM as TINY_GROUP_NORM

# No SpecAugment or LayerDrop: the two models of a comparison draw nothing.
GROUP_NORM = {**TINY_GROUP_NORM, "mask_time_prob": 0.0, "layerdrop": 0.0}


def audio_needs_gradient(model: Any, audio: torch.Tensor, labels: torch.Tensor) -> bool:
    """Runs one training step; whether the first convolution's input (the audio) required a gradient."""
    seen: list[bool] = []
    first = model.wav2vec2.feature_extractor.conv_layers[0].conv
    hook = first.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0].requires_grad))
    torch.manual_seed(1)
    model(input_values=audio, labels=labels).loss.backward()
    hook.remove()
    return seen[0]


def test_a_trainable_feature_encoder_gets_the_same_gradients_without_the_audio_gradient() -> None:
    from transformers import Wav2Vec2ForCTC

    torch.manual_seed(0)
    ours = build_model(ModelSection(config=GROUP_NORM, freeze_feature_encoder=False), 12, 0)
    stock = Wav2Vec2ForCTC(ours.config)
    stock.load_state_dict(ours.state_dict())
    audio, labels = torch.randn(3, 8000), torch.randint(1, 12, (3, 5))
    ours.train()
    stock.train()

    assert not audio_needs_gradient(ours, audio, labels)
    assert audio_needs_gradient(stock, audio, labels)  # what the stock encoder does, for its checkpointing
    grads = {name: p.grad for name, p in stock.named_parameters() if p.grad is not None}
    assert any("feature_extractor" in name for name in grads)
    for name, p in ours.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, grads[name]), name


def test_a_frozen_feature_encoder_gets_no_gradient() -> None:
    model = build_model(ModelSection(config=GROUP_NORM, freeze_feature_encoder=True), 12, 0)
    model.train()
    assert not audio_needs_gradient(model, torch.randn(2, 8000), torch.randint(1, 12, (2, 5)))
    encoder = model.wav2vec2.feature_extractor
    assert all(p.grad is None and not p.requires_grad for p in encoder.parameters())
