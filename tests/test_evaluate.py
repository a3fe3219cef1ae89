"""Evaluation: batched equals batch-1 exactly (masked group norm, attention mask), on 1, 2 and 3 processes,
every utterance once."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from asrlaunch.data.sampler import eval_batches, shard_batches
from asrlaunch.engine.evaluate import masked_group_norm

from .conftest import PYTHON, RECIPES, ROOT, python_env

GROUP_NORM = {  # wav2vec2-base's layout, tiny: group-norm conv stack, post-norm layers
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "conv_dim": [16, 16, 16],
    "conv_stride": [5, 8, 8],
    "conv_kernel": [10, 8, 8],
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 2,
    "feat_extract_norm": "group",
    "do_stable_layer_norm": False,
}


@pytest.mark.parametrize("groups", [12, 4, 1])
def test_masked_group_norm_equals_the_unpadded_computation(groups: int) -> None:
    rng = torch.Generator().manual_seed(groups)
    norm = torch.nn.GroupNorm(groups, 12)
    with torch.no_grad():
        norm.weight.normal_(generator=rng)
        norm.bias.normal_(generator=rng)
    x = torch.randn(5, 12, 97, generator=rng) * 3 + 1
    valid = torch.tensor([97, 40, 2, 73, 96])
    out = masked_group_norm(x, valid, norm)
    for b, n in enumerate(valid.tolist()):
        expected = norm(x[b : b + 1, :, :n])[0]
        assert torch.allclose(out[b, :, :n], expected, atol=1e-6, rtol=1e-6)
        assert not out[b, :, n:].any()


def test_eval_batches_cover_every_utterance_once_within_the_budget() -> None:
    lengths = np.random.default_rng(0).integers(8000, 130000, 203)
    batches = eval_batches(lengths, 400000)
    assert sorted(i for batch in batches for i in batch) == list(range(203))
    for batch in batches:
        assert len(batch) == 1 or lengths[batch[0]] * len(batch) <= 400000
        assert lengths[batch[0]] == max(lengths[batch])  # padded to its first
    for world in (1, 2, 3, 8):
        shares = shard_batches(batches, lengths, world)
        assert sorted(i for share in shares for batch in share for i in batch) == list(range(203))
        cost = [int(lengths[b[0]]) * len(b) for b in batches]
        loads = [sum(int(lengths[b[0]]) * len(b) for b in share) for share in shares]
        assert max(loads) - min(loads) <= max(cost)
        firsts = sorted(int(lengths[share[0][0]]) * len(share[0]) for share in shares)
        assert firsts == sorted(cost)[-world:]  # dealt largest first: each rank opens with one of the largest


def evaluate_in_process(config: dict, corpus_dir: Path, cache: Path, mode: str) -> tuple[list, int]:
    """The utterances' outcomes, and how many batches (forward passes) they took."""
    from accelerate import Accelerator

    from asrlaunch.core.recipe import ModelSection
    from asrlaunch.data.timit import load_corpus
    from asrlaunch.engine.evaluate import evaluate
    from asrlaunch.engine.model import build_model

    corpus = load_corpus(corpus_dir, cache)
    torch.manual_seed(0)
    model = build_model(
        ModelSection(config=config), corpus.vocab_size, corpus.processor.tokenizer.pad_token_id
    )
    passes = []
    result = evaluate(
        model,
        corpus.test,
        corpus.processor,
        Accelerator(cpu=True),
        mode=mode,
        max_batch_seconds=9,
        on_batch=lambda: passes.append(1),
    )
    assert result is not None
    return result.utterances, len(passes)


@pytest.mark.parametrize("layout", ["group-norm", "layer-norm (smoke)"])
def test_batched_evaluation_equals_batch_1(layout: str, tones_corpus: Path, tmp_path: Path) -> None:
    import yaml

    smoke = yaml.safe_load((RECIPES / "smoke.yaml").read_text())["model"]["config"]
    config = GROUP_NORM if layout == "group-norm" else smoke
    batched, batched_passes = evaluate_in_process(config, tones_corpus, tmp_path, "batched")
    single, single_passes = evaluate_in_process(config, tones_corpus, tmp_path, "sequential")
    assert single_passes == 16 and batched_passes < 8  # batches of several utterances, padded and masked
    assert [u.index for u in batched] == [u.index for u in single] == list(range(16))
    for a, b in zip(batched, single, strict=True):
        assert a.prediction == b.prediction
        assert a.loss == pytest.approx(b.loss, rel=1e-5)


def evaluate_cli(model: Path, corpus: Path, processes: int, mode: str, out: Path, *overrides: str) -> dict:
    launcher = (
        [PYTHON]
        if processes == 1
        else [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    )
    done = subprocess.run(
        [
            *launcher,
            "-m",
            "asrlaunch",
            "evaluate",
            str(RECIPES / "smoke.yaml"),
            "--model",
            str(model),
            "--mode",
            mode,
            "--out",
            str(out),
            f"data.dir={corpus}",
            f"data.cache_dir={model.parent.parent / 'cache'}",
            "eval.max_batch_seconds=9",
            *overrides,
        ],
        env=python_env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    summary["utterances"] = [json.loads(line) for line in out.read_text().splitlines()]
    return summary


def test_sharded_evaluation_agrees_on_1_2_and_3_processes(
    trained_smoke: Path, tones_corpus: Path, tmp_path: Path
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    model = trained_smoke / "final"
    shapes = ((1, "sequential"), (1, "batched"), (2, "batched"), (3, "batched"), (2, "sequential"))

    def evaluate(processes: int, mode: str) -> dict:
        return evaluate_cli(model, tones_corpus, processes, mode, tmp_path / f"{processes}-{mode}.jsonl")

    with ThreadPoolExecutor(3) as pool:  # one thread per process: start-ups overlap on the idle core
        runs = dict(zip(shapes, pool.map(lambda shape: evaluate(*shape), shapes), strict=True))
    reference = runs[(1, "sequential")]
    ids = [u["id"] for u in reference["utterances"]]
    assert len(ids) == len(set(ids)) == 16  # every utterance once
    assert 0.0 <= reference["wer"] < 1.0 and any(u["prediction"] for u in reference["utterances"])
    for (processes, mode), run in runs.items():
        assert run["world_size"] == processes and run["eval_samples"] == 16
        assert [u["id"] for u in run["utterances"]] == ids, (processes, mode)
        assert [u["prediction"] for u in run["utterances"]] == [
            u["prediction"] for u in reference["utterances"]
        ]
        assert run["wer"] == reference["wer"]
        tolerance = 1e-6 if mode == "sequential" else 1e-5
        assert run["eval_loss"] == pytest.approx(reference["eval_loss"], rel=tolerance), (processes, mode)
        for mine, theirs in zip(run["utterances"], reference["utterances"], strict=True):
            assert mine["loss"] == pytest.approx(theirs["loss"], rel=tolerance)


def test_the_final_model_transcribes_with_a_pipeline_as_the_engine_does(
    trained_smoke: Path, tones_corpus: Path, tmp_path: Path
) -> None:
    """`final/` is a Hugging Face model folder: transformers' pipeline hears what the engine's evaluation
    predicted, utterance by utterance."""
    from transformers import pipeline

    from asrlaunch.core.rundir import RunDir
    from asrlaunch.data.timit import read_audio, scan_split

    engine = evaluate_cli(trained_smoke / "final", tones_corpus, 1, "sequential", tmp_path / "eval.jsonl")
    predicted = {u["id"]: u["prediction"] for u in engine["utterances"]}
    asr = pipeline("automatic-speech-recognition", model=str(trained_smoke / "final"), device="cpu")
    utterances = scan_split(tones_corpus, "test")[:6]
    heard = {}
    for utterance in utterances:
        result: Any = asr({"raw": read_audio(utterance.audio), "sampling_rate": 16000})
        heard[utterance.id] = result["text"]
    assert heard == {u.id: predicted[u.id] for u in utterances} and any(heard.values())
    assert json.loads(RunDir(trained_smoke).finished_marker.read_text()) == {"step": 200, "done": True}


def test_group_norm_model_batched_equals_batch_1_on_2_processes(tones_corpus: Path, tmp_path: Path) -> None:
    from asrlaunch.core.recipe import ModelSection
    from asrlaunch.data.timit import load_corpus
    from asrlaunch.engine.model import build_model

    cache = tmp_path / "cache"
    corpus = load_corpus(tones_corpus, cache)
    torch.manual_seed(0)
    model = build_model(
        ModelSection(config=GROUP_NORM), corpus.vocab_size, corpus.processor.tokenizer.pad_token_id
    )
    folder = tmp_path / "run" / "final"
    model.save_pretrained(folder)
    corpus.processor.save_pretrained(folder)
    batched = evaluate_cli(folder, tones_corpus, 2, "batched", tmp_path / "b.jsonl")
    single = evaluate_cli(folder, tones_corpus, 2, "sequential", tmp_path / "s.jsonl")
    assert batched["wer"] == single["wer"]
    for a, b in zip(batched["utterances"], single["utterances"], strict=True):
        assert a["id"] == b["id"] and a["prediction"] == b["prediction"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
