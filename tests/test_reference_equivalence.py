"""timit32 is the reference run: the reference pipeline, re-implemented here from the source of transformers'
`examples/pytorch/speech-recognition/run_speech_recognition_ctc.py` (the script behind the card), the
`timit_asr` dataset script and the Trainer of transformers 4.15, beside ours from timit32's settings, on a
spoken corpus whose text has apostrophes, digits and punctuation: same vocabulary (ids included), same labels,
same loss and gradients on the same batch."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import yaml

from asrlaunch.core.recipe import load_recipe
from asrlaunch.data.synth import espeak_audio, espeak_available
from asrlaunch.data.timit import load_corpus
from asrlaunch.engine.batches import collate
from asrlaunch.engine.model import build_model

from .conftest import PYTHON, RECIPES, ROOT, python_env

pytestmark = pytest.mark.skipif(
    not espeak_available() and not os.environ.get("CI"), reason="espeak-ng and sox are not installed"
)

TRAIN = (
    "Don't ask me to carry an oily rag like that.",
    "The 2 boys' kites flew 30 feet high!",
    "It's 4 o'clock; we're late.",
    "Rock-and-roll (loud) music #1?",
    '"Yes," she said: 100% sure.',
    "Her 3rd try & his 2nd try both failed.",
    "Why'd you pay $5 for that?",
    "She had your dark suit in greasy wash water all year.",
)
TEST = ("The cat's 9 lives.", "Fifty-five words, quoted.", "Call 911 now!", "A b c d e.")
# A wav2vec2-base-shaped model (group-norm conv stack, post-norm layers, 320x downsampling), tiny.
TINY = (
    "{hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 64, "
    "conv_dim: [16, 16, 16], conv_stride: [5, 8, 8], conv_kernel: [10, 8, 8], "
    "num_conv_pos_embeddings: 16, num_conv_pos_embedding_groups: 2}"
)


@pytest.fixture(scope="module")
def quirky_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TIMIT's layout and .TXT format, spoken by espeak-ng, with the characters the script's regex eats."""
    root = tmp_path_factory.mktemp("quirky") / "TIMIT"
    for split, sentences in (("TRAIN", TRAIN), ("TEST", TEST)):
        for index, sentence in enumerate(sentences):
            folder = root / split / "DR1" / f"MSPK{index}"
            folder.mkdir(parents=True)
            espeak_audio(sentence, "en-us", 170, 50, folder / "SX1.WAV", "sphere")
            frames = soundfile.info(str(folder / "SX1.WAV")).frames
            (folder / "SX1.TXT").write_text(f"0 {frames} {sentence}\n")
    return root


# -- the reference pipeline ---------------------------------------------------------------------------------
# The run's --chars_to_ignore.
CHARS_TO_IGNORE = [",", "?", ".", "!", "-", ";", ":", '"', "“", "%", "‘", "”", "�"]
CHARS_TO_IGNORE_REGEX = f"[{''.join(CHARS_TO_IGNORE)}]"  # built as the script builds it: not escaped


def timit_asr_text(txt: Path) -> str:
    """datasets' timit_asr.py: `" ".join(op.readlines()[0].split()[2:])`."""
    return " ".join(txt.read_text().splitlines()[0].split()[2:])


def remove_special_characters(text: str) -> str:
    return re.sub(CHARS_TO_IGNORE_REGEX, "", text).lower() + " "


def create_vocabulary_from_data(splits: dict[str, list[str]]) -> dict[str, int]:
    vocabs = [set(" ".join(targets)) for targets in splits.values()]
    vocab_set = functools.reduce(lambda a, b: a | b, vocabs)
    vocab_dict = {v: k for k, v in enumerate(sorted(vocab_set))}
    vocab_dict["|"] = vocab_dict[" "]
    del vocab_dict[" "]
    vocab_dict["[UNK]"] = len(vocab_dict)
    vocab_dict["[PAD]"] = len(vocab_dict)
    return vocab_dict


def reference_pipeline(corpus: Path, folder: Path) -> dict:
    from transformers import Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor

    files = {split: sorted((corpus / split).rglob("*.TXT")) for split in ("TRAIN", "TEST")}
    targets = {
        split: [remove_special_characters(timit_asr_text(f)) for f in txts] for split, txts in files.items()
    }
    vocab = create_vocabulary_from_data(targets)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = Wav2Vec2CTCTokenizer(
        str(folder / "vocab.json"), unk_token="[UNK]", pad_token="[PAD]", word_delimiter_token="|"
    )
    # wav2vec2-base's preprocessor_config.json
    extractor = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=False
    )
    rows = []
    for txt, target in zip(files["TRAIN"], targets["TRAIN"], strict=True):
        audio, rate = soundfile.read(str(txt.with_suffix(".WAV")), dtype="float32")
        rows.append(
            {
                "id": f"{txt.parent.name}_{txt.stem}",
                "input_values": extractor(audio, sampling_rate=rate).input_values[0],
                "labels": tokenizer(target).input_ids,
            }
        )
    config = Wav2Vec2Config(**yaml.safe_load(TINY))
    config.update(
        {
            "feat_proj_dropout": 0.0,
            "attention_dropout": 0.0,
            "hidden_dropout": 0.0,
            "final_dropout": 0.0,
            "mask_time_prob": 0.05,
            "mask_time_length": 10,
            "mask_feature_prob": 0.0,
            "mask_feature_length": 10,
            "gradient_checkpointing": False,
            "layerdrop": 0.0,
            "ctc_loss_reduction": "mean",
            "pad_token_id": tokenizer.pad_token_id,
            # The script's len(tokenizer), which counts the <s> and </s> the tokenizer adds (the card's
            # config.json: vocab_size 31 for TIMIT's 29 entries, added_tokens.json {"<s>": 29, "</s>": 30}).
            "vocab_size": len(tokenizer),
            "activation_dropout": 0.0,
        }
    )
    return {"vocab": vocab, "tokenizer": tokenizer, "extractor": extractor, "rows": rows, "config": config}


def reference_collate(reference: dict, rows: list[dict]) -> dict[str, torch.Tensor]:
    """DataCollatorCTCWithPadding: pad audio to the longest, labels with -100 where padded."""
    batch = reference["extractor"].pad(
        [{"input_values": r["input_values"]} for r in rows], padding="longest", return_tensors="pt"
    )
    labels = reference["tokenizer"].pad(
        [{"input_ids": r["labels"]} for r in rows], padding="longest", return_tensors="pt"
    )
    batch["labels"] = labels["input_ids"].masked_fill(labels.attention_mask.ne(1), -100)
    return dict(batch)


# -- ours --------------------------------------------------------------------------------------------------
def ours(corpus: Path, cache: Path) -> dict:
    recipe = load_recipe(RECIPES / "timit32.yaml", [f"data.dir={corpus}", f"model.config={TINY}"])
    prepared = load_corpus(corpus, cache, normalization=recipe.data.text_normalization)
    return {"recipe": recipe, "corpus": prepared}


def test_text_targets_and_vocabulary_are_the_reference_ones(quirky_corpus: Path, tmp_path: Path) -> None:
    reference = reference_pipeline(quirky_corpus, tmp_path / "reference")
    mine = ours(quirky_corpus, tmp_path / "cache")["corpus"]
    assert mine.vocab == reference["vocab"]
    assert list(mine.vocab) == list(reference["vocab"])  # the same order too
    assert "'" not in mine.vocab and not any(c.isdigit() for c in mine.vocab)  # the range !-; at work
    by_id = {row["id"]: row for row in reference["rows"]}
    assert sorted(mine.train.column("id")) == sorted(by_id)
    for row in mine.train:
        expected = by_id[row["id"]]
        assert row["labels"].tolist() == expected["labels"]
        assert row["labels"][-1] == mine.vocab["|"]  # every target ends with the word delimiter
        np.testing.assert_array_equal(row["input_values"], expected["input_values"])


def test_loss_and_gradients_on_one_batch_equal_the_reference(quirky_corpus: Path, tmp_path: Path) -> None:
    from transformers import Wav2Vec2ForCTC

    reference = reference_pipeline(quirky_corpus, tmp_path / "reference")
    mine = ours(quirky_corpus, tmp_path / "cache")
    corpus, recipe = mine["corpus"], mine["recipe"]
    torch.manual_seed(0)
    model = build_model(recipe.model, corpus.vocab_size, corpus.processor.tokenizer.pad_token_id)
    theirs = Wav2Vec2ForCTC(reference["config"])
    theirs.freeze_feature_encoder()  # --freeze_feature_encoder, the script's default
    theirs.load_state_dict(model.state_dict())
    keys = (
        "mask_time_prob",
        "mask_time_length",
        "layerdrop",
        "hidden_dropout",
        "vocab_size",
        "ctc_zero_infinity",
    )
    for key in keys:
        assert getattr(model.config, key) == getattr(theirs.config, key), key
    assert model.config.vocab_size == len(reference["vocab"]) + 2 and model.config.ctc_zero_infinity is False
    ours_added = {t.content: i for i, t in corpus.processor.tokenizer.added_tokens_decoder.items()}
    theirs_added = {t.content: i for i, t in reference["tokenizer"].added_tokens_decoder.items()}
    assert ours_added == theirs_added and ours_added["<s>"] == len(reference["vocab"])

    ids = corpus.train.column("id")
    indices = np.arange(8)
    batch = collate(corpus.train, indices, int(corpus.train.numbers("length")[indices].max()))
    by_id = {row["id"]: row for row in reference["rows"]}
    expected = reference_collate(reference, [by_id[ids[int(i)]] for i in indices])
    assert torch.equal(batch.labels, expected["labels"])
    assert torch.equal(batch.input_values, expected["input_values"])

    results = []
    for net, inputs in ((model, batch.input_values), (theirs, expected["input_values"])):
        net.train()
        np.random.seed(1)  # SpecAugment's time masks are drawn with numpy
        torch.manual_seed(1)
        loss = net(input_values=inputs, labels=batch.labels).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (loss_ours, grads_ours), (loss_ref, grads_ref) = results
    assert torch.isfinite(loss_ref)
    assert float(loss_ours) == pytest.approx(float(loss_ref), rel=1e-6)
    assert grads_ours.keys() == grads_ref.keys() and "feature_extractor" not in " ".join(grads_ours)
    for name, grad in grads_ref.items():
        scale = float(grad.norm()) or 1.0
        assert float((grads_ours[name] - grad).norm()) <= 1e-5 * scale, name


def test_engine_writes_the_reference_vocabulary(quirky_corpus: Path, tmp_path: Path) -> None:
    reference = reference_pipeline(quirky_corpus, tmp_path / "reference")
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [
            PYTHON,
            "-m",
            "asrlaunch",
            "train",
            str(RECIPES / "timit32.yaml"),
            "--run-dir",
            str(run_dir),
            f"data.dir={quirky_corpus}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"model.config={TINY}",
            "train.max_steps=1",
            "train.max_micro_batch_size=8",
        ],
        env=python_env(OMP_NUM_THREADS="2"),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((run_dir / "final" / "vocab.json").read_text()) == reference["vocab"]
    final = run_dir / "final"
    vocab = json.loads((final / "vocab.json").read_text())
    config = json.loads((final / "config.json").read_text())
    assert config["vocab_size"] == len(vocab) + 2 and config["hidden_dropout"] == 0.0
    assert config["ctc_zero_infinity"] is False and config["pad_token_id"] == vocab["[PAD]"]
    assert json.loads((final / "added_tokens.json").read_text()) == {
        "<s>": len(vocab),
        "</s>": len(vocab) + 1,
    }
    special = json.loads((final / "special_tokens_map.json").read_text())
    assert special == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "[UNK]", "pad_token": "[PAD]"}


def test_weight_decay_goes_where_the_trainer_put_it(tmp_path: Path) -> None:
    """4.15's Trainer: decay on every parameter outside LayerNorm modules whose name has no `bias`
    (`masked_spec_embed` included); ours must build the same two groups."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC
    from transformers.trainer_pt_utils import get_parameter_names

    from asrlaunch.engine.model import build_optimizer

    recipe = load_recipe(RECIPES / "timit32.yaml", [f"data.dir={tmp_path}", f"model.config={TINY}"])
    model = Wav2Vec2ForCTC(Wav2Vec2Config(**yaml.safe_load(TINY)))
    optimizer = build_optimizer(model, recipe.train)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in optimizer.param_groups[0]["params"]}
    trainers = {n for n in get_parameter_names(model, [torch.nn.LayerNorm]) if "bias" not in n}
    assert decayed == trainers and "wav2vec2.masked_spec_embed" in decayed
    assert (
        optimizer.param_groups[0]["weight_decay"] == 0.005 and optimizer.param_groups[1]["weight_decay"] == 0
    )
