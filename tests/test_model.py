"""The model as the engine builds it: what it changes in a stock Wav2Vec2ForCTC, and what it must not."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import Wav2Vec2Config

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


def test_a_pretrained_checkpoint_trains_without_activation_checkpointing_as_the_card(tmp_path: Path) -> None:
    """The hub's wav2vec2-base config.json says `"gradient_checkpointing": true` (a key transformers turns
    into activation checkpointing at load); the card's script overwrote it with false. Here a local checkpoint
    whose config.json says the same, with the recipe's overrides and the CTC head applied on top."""
    from transformers import Wav2Vec2ForCTC, Wav2Vec2Model

    config: dict[str, Any] = GROUP_NORM
    Wav2Vec2Model(Wav2Vec2Config(**config)).save_pretrained(tmp_path)  # no CTC head, as the hub's
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**saved, "gradient_checkpointing": True}))
    assert Wav2Vec2ForCTC.from_pretrained(tmp_path).wav2vec2.encoder.gradient_checkpointing  # the hub's way

    section = ModelSection(name_or_path=str(tmp_path), overrides={"mask_time_prob": 0.05, "layerdrop": 0.0})
    model = build_model(section, 12, 3)
    assert not model.wav2vec2.encoder.gradient_checkpointing
    assert (model.config.mask_time_prob, model.config.vocab_size, model.config.pad_token_id) == (0.05, 12, 3)
    assert model.lm_head.out_features == 12


def test_a_ctc_checkpoint_of_another_vocabulary_gets_a_fresh_head_and_nothing_else_changes(
    tmp_path: Path, capsys: Any
) -> None:
    """Starting from a CTC fine-tuned model (another run's final/, a hub model such as wav2vec2-base-960h):
    its encoder weights are kept, its head is replaced by one of this corpus's size (transformers would refuse
    the load), the same size keeps the head; an override that changes another weight's shape is a recipe
    error."""
    import pytest
    from transformers import Wav2Vec2ForCTC

    from asrlaunch.core.recipe import RecipeError

    config: dict[str, Any] = {**GROUP_NORM, "vocab_size": 32}
    saved = Wav2Vec2ForCTC(Wav2Vec2Config(**config))
    saved.save_pretrained(tmp_path)
    section = ModelSection(name_or_path=str(tmp_path))
    same = build_model(section, 32, 0)
    assert torch.equal(same.lm_head.weight, saved.lm_head.weight)
    assert "fresh head" not in capsys.readouterr().out
    other = build_model(section, 30, 0)
    assert other.lm_head.out_features == 30
    assert "a fresh head of 30 outputs" in capsys.readouterr().out
    kept = saved.state_dict()
    assert all(torch.equal(kept[k], v) for k, v in other.state_dict().items() if not k.startswith("lm_head."))
    reshaped = ModelSection(name_or_path=str(tmp_path), overrides={"num_conv_pos_embeddings": 8})
    with pytest.raises(RecipeError, match=r"pos_conv_embed.*leave out the overrides"):
        build_model(reshaped, 32, 0)


def test_a_key_the_config_does_not_have_is_refused_not_kept(tmp_path: Path) -> None:
    """transformers keeps an unknown key as an attribute nothing reads: a typo would train without it."""
    import pytest

    from asrlaunch.core.recipe import RecipeError

    typo = ModelSection(config={**GROUP_NORM, "hiden_size": 32}, overrides={"mask_time_prb": 0.05})
    with pytest.raises(RecipeError) as refused:
        build_model(typo, 12, 0)
    lines = str(refused.value).splitlines()
    assert lines[0].startswith("model.config.hiden_size: not a Wav2Vec2Config key (did you mean hidden_size")
    assert lines[1].startswith("model.overrides.mask_time_prb: not a Wav2Vec2Config key (did you mean ")
    assert "mask_time_prob" in lines[1]
    # A checkpoint whose config.json carries a key transformers no longer reads (older hub configs do):
    # transformers keeps it as an attribute, but an override of it would still change nothing.
    config: dict[str, Any] = {**GROUP_NORM, "mask_channel_prob": 0.0}
    Wav2Vec2Config(**config).save_pretrained(tmp_path)
    for key in ("layer_drop", "mask_channel_prob"):
        with pytest.raises(RecipeError, match=rf"model\.overrides\.{key}: not a Wav2Vec2Config key"):
            build_model(ModelSection(name_or_path=str(tmp_path), overrides={key: 0.1}), 12, 0)


# transformers 4.x's form of the config (abridged from its configuration_wav2vec2.py): every setting an
# argument of __init__, some attributes derived there.
CONFIG_4X = """
class Wav2Vec2Config(PretrainedConfig):
    model_type = "wav2vec2"

    def __init__(
        self,
        vocab_size=32,
        hidden_size=768,
        mask_time_prob=0.05,
        conv_dim=(512, 512, 512, 512, 512, 512, 512),
        pad_token_id=0,
        **kwargs,
    ):
        super().__init__(**kwargs, pad_token_id=pad_token_id)
        self.hidden_size = hidden_size
        self.conv_dim = list(conv_dim)
        self.num_feat_extract_layers = len(self.conv_dim)
        self.mask_time_prob = mask_time_prob

    @property
    def inputs_to_logits_ratio(self):
        return functools.reduce(operator.mul, self.conv_stride, 1)
"""


def test_the_dry_run_reads_the_same_keys_from_transformers_source() -> None:
    """The launcher's check (no torch) accepts every key of the installed config and refuses a typo in the
    job's own words; it reads the 4.x form of the class too, and finds none in a source without it."""
    import pytest
    import transformers

    from asrlaunch.core.model_keys import class_names, keys_in_source
    from asrlaunch.core.recipe import RecipeError, load_recipe
    from asrlaunch.launcher.preflight import check_model_keys

    from .conftest import RECIPES

    keys = keys_in_source()
    assert keys is not None
    assert {key for key in Wav2Vec2Config().to_dict() if not key.startswith("_")} <= keys
    assert "mask_time_prb" not in keys and "layer_drop" not in keys
    assert "num_labels" in keys and not {"to_dict", "use_return_dict"} & keys  # a method, a getter alone
    with pytest.raises(RecipeError, match=r"overrides\.to_dict: .*\n.*overrides\.use_return_dict: "):
        build_model(ModelSection(config=GROUP_NORM, overrides={"to_dict": 1, "use_return_dict": 0}), 12, 0)
    typos = {"mask_time_prb": 0.05, "layer_drop": 0.1}
    check = check_model_keys(
        load_recipe(RECIPES / "timit32.yaml", [f"model.overrides.{k}={v}" for k, v in typos.items()])
    )
    with pytest.raises(RecipeError) as refused:
        build_model(ModelSection(config=GROUP_NORM, overrides=typos), 12, 0)
    assert not check.ok and check.message == str(refused.value).replace("\n", "; ")
    clean = check_model_keys(load_recipe(RECIPES / "timit32.yaml")).line()
    assert clean == f"  ok  model keys: 10 key(s) of Wav2Vec2Config (transformers {transformers.__version__})"
    old = class_names(CONFIG_4X, "Wav2Vec2Config")
    assert old is not None
    assert {"vocab_size", "mask_time_prob", "num_feat_extract_layers", "model_type"} <= old
    assert not {"self", "kwargs", "inputs_to_logits_ratio"} & old  # its only property has no setter
    assert class_names("class Other:\n    x: int = 1\n", "Wav2Vec2Config") is None
