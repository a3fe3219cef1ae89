"""Evaluation: per-utterance loss and greedy CTC transcripts, sharded over ranks, WER once on rank 0.

Two modes (`eval.mode`), with equal results:
- `sequential`: one utterance at a time, unpadded (the reference card's eval_batch_size 1).
- `batched` (default): utterances sorted by length into batches of at most `eval.max_batch_seconds` of padded
  audio, balanced over ranks by audio. Exact, not merely close: wav2vec2-base's feature encoder normalises
  each channel over time in its first layer (GroupNorm, no attention mask), so zero padding would change
  every frame; here that norm is computed over each utterance's valid frames only (`masked_group_norm`), the
  later conv layers see only valid frames for valid outputs, and the encoder gets the attention mask (padded
  frames zeroed before the positional convolution, masked out of attention). Layer-norm conv stacks
  (`feat_extract_norm: layer`) normalise per frame and need only the mask.

    asrlaunch evaluate RECIPE --model RUN_DIR/final [--mode batched|sequential] [--out FILE.jsonl]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jiwer
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn
from transformers import Wav2Vec2ForCTC, Wav2Vec2Processor

from asrlaunch.core import gc_policy
from asrlaunch.data.sampler import eval_batches, shard_batches
from asrlaunch.data.table import Table
from asrlaunch.engine.batches import pad_rows
from asrlaunch.job.heartbeat import waiting

SAMPLE_RATE = 16000


@dataclass(frozen=True)
class Utterance:
    index: int
    loss: float
    prediction: str
    reference: str


@dataclass(frozen=True)
class EvalResult:
    eval_loss: float
    wer: float
    samples: int
    utterances: list[Utterance]


def masked_group_norm(x: torch.Tensor, valid: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """GroupNorm of (batch, channels, time) over each utterance's first `valid[b]` frames only: the same
    kernel on each unpadded slice, so each utterance gets what it gets alone. Frames past `valid` are zero."""
    groups, weight, bias, eps = norm.num_groups, norm.weight, norm.bias, norm.eps
    pieces = [
        nn.functional.group_norm(x[b : b + 1, :, :n], groups, weight, bias, eps)
        for b, n in enumerate(valid.tolist())
    ]
    # the norm's own dtype: under fp16 autocast GroupNorm runs and returns fp32, as it does unpadded
    out = x.new_zeros(x.shape, dtype=pieces[0].dtype)
    for b, piece in enumerate(pieces):
        out[b, :, : piece.shape[-1]] = piece[0]
    return out


def first_conv_norm(model: Wav2Vec2ForCTC) -> nn.GroupNorm | None:
    """The time-normalising GroupNorm of a group-norm conv stack (wav2vec2-base), None for layer norm."""
    norm = getattr(model.wav2vec2.feature_extractor.conv_layers[0], "layer_norm", None)
    return norm if isinstance(norm, nn.GroupNorm) else None


@contextmanager
def exact_padding(model: Wav2Vec2ForCTC, lengths: torch.Tensor) -> Iterator[None]:
    """While inside, the first conv layer's GroupNorm sees only each utterance's valid frames."""
    norm = first_conv_norm(model)
    if norm is None:
        yield
        return
    kernel, stride = model.config.conv_kernel[0], model.config.conv_stride[0]
    valid = (lengths - kernel) // stride + 1

    def forward(x: torch.Tensor) -> torch.Tensor:
        return masked_group_norm(x, valid.to(x.device), norm)

    # An instance attribute shadows the class's forward (a forward hook would compute the full norm first).
    norm.forward = forward  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        del norm.forward


def ctc_losses(logits: torch.Tensor, labels: torch.Tensor, frames: torch.Tensor, config: Any) -> torch.Tensor:
    """Per-utterance CTC loss, each divided by its target length: the terms whose batch mean is the model's
    loss with `ctc_loss_reduction: mean` (log-softmax in fp32, cudnn off, as transformers computes it)."""
    mask = (labels >= 0) & (labels != config.pad_token_id)
    targets = labels.masked_select(mask)
    log_probs = nn.functional.log_softmax(logits, dim=-1, dtype=torch.float32).transpose(0, 1)
    with torch.backends.cudnn.flags(enabled=False):
        losses = nn.functional.ctc_loss(
            log_probs,
            targets,
            frames,
            mask.sum(-1),
            blank=config.pad_token_id,
            reduction="none",
            zero_infinity=config.ctc_zero_infinity,
        )
    return losses / mask.sum(-1).clamp(min=1)


def padded(
    values: Sequence[np.ndarray], targets: Sequence[np.ndarray], dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Audio zero-padded to the longest, labels padded with -100, and the true lengths."""
    lengths = np.array([len(v) for v in values])
    audio, labels = pad_rows(values, targets, int(lengths.max()))
    as_tensor = torch.from_numpy
    return as_tensor(audio).to(device, dtype), as_tensor(labels).to(device), as_tensor(lengths).to(device)


def evaluate_batch(
    model: Wav2Vec2ForCTC, rows: dict[str, Any], dtype: torch.dtype, device: torch.device
) -> tuple[list[float], list[list[int]]]:
    """Losses and greedy token ids of a batch (columns of rows), exact whatever the padding (one utterance:
    no padding, the model exactly as the reference calls it)."""
    audio, labels, lengths = padded(rows["input_values"], rows["labels"], dtype, device)
    if len(audio) == 1:
        logits = model(input_values=audio).logits
    else:
        attention = (torch.arange(audio.shape[1], device=device)[None, :] < lengths[:, None]).long()
        with exact_padding(model, lengths):
            logits = model(input_values=audio, attention_mask=attention).logits
    frames = torch.as_tensor(model._get_feat_extract_output_lengths(lengths)).to(torch.long)  # type: ignore[arg-type]
    losses = ctc_losses(logits, labels, frames, model.config)
    ids = logits.argmax(dim=-1).tolist()
    return losses.tolist(), [row[:n] for row, n in zip(ids, frames.tolist(), strict=True)]


def rank_eval_batches(
    lengths: np.ndarray, mode: str, max_batch_seconds: float, rank: int, world: int
) -> list[list[int]]:
    """The utterance indices rank `rank` evaluates, batch by batch."""
    if mode == "sequential":
        return [[i] for i in range(rank, len(lengths), world)]
    return shard_batches(eval_batches(lengths, int(max_batch_seconds * SAMPLE_RATE)), lengths, world)[rank]


def evaluate(
    net: Wav2Vec2ForCTC,
    table: Table,
    processor: Wav2Vec2Processor,
    accelerator: Accelerator,
    input_dtype: torch.dtype = torch.float32,
    mode: str = "batched",
    max_batch_seconds: float = 60.0,
    on_batch: Callable[[], None] | None = None,
) -> EvalResult | None:
    """Rank r evaluates its share; the results are gathered and scored once, on rank 0 (None elsewhere).
    `net` is the bare model, not its DDP or DeepSpeed wrapper: ranks run different numbers of batches."""
    lengths = table.numbers("length")
    batches = rank_eval_batches(
        lengths, mode, max_batch_seconds, accelerator.process_index, accelerator.num_processes
    )
    was_training = net.training
    net.eval()
    outcomes: list[tuple[int, float, str, str]] = []
    autocast = accelerator.autocast() if input_dtype == torch.float32 else nullcontext()
    with torch.no_grad(), autocast:
        for indices in batches:
            picked = table.rows(list(indices), ("input_values", "labels", "text"))  # one read per batch
            losses, ids = evaluate_batch(net, picked, input_dtype, accelerator.device)
            predictions = processor.batch_decode(ids)
            if on_batch is not None:
                on_batch()
            outcomes.extend(
                (int(i), loss, prediction, str(text))
                for i, loss, prediction, text in zip(
                    indices, losses, predictions, picked["text"], strict=True
                )
            )
    net.train(was_training)
    with waiting():  # a rank done with its share waits here for the others
        gathered = sorted(gather_object(outcomes))
    if not accelerator.is_main_process:
        return None
    utterances = [Utterance(*item) for item in gathered]
    return EvalResult(
        eval_loss=sum(u.loss for u in utterances) / len(utterances),
        wer=float(jiwer.wer([u.reference for u in utterances], [u.prediction for u in utterances])),
        samples=len(utterances),
        utterances=utterances,
    )


def evaluate_saved_model(
    recipe_path: str, model_dir: Path, overrides: Sequence[str], mode: str
) -> dict[str, Any]:
    """Evaluate a saved model (a run's final/) on its recipe's test split, on every process of the world."""
    import time

    from asrlaunch.core.recipe import load_recipe
    from asrlaunch.data.prepare import prepare_corpus
    from asrlaunch.engine.runtime import adopt_thread_limit, effective_precision
    from asrlaunch.job.task import adopt_launcher_environment

    adopt_launcher_environment()
    adopt_thread_limit()
    recipe = load_recipe(recipe_path, overrides)
    on_cpu = not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=on_cpu, mixed_precision=effective_precision(recipe.train.mixed_precision, on_cpu)
    )
    with accelerator.main_process_first():
        corpus = prepare_corpus(recipe)
    processor = Wav2Vec2Processor.from_pretrained(model_dir)
    if processor.tokenizer.get_vocab() != corpus.processor.tokenizer.get_vocab():
        raise ValueError(
            f"{model_dir}: its vocabulary differs from the one of {recipe.data.dir} ({recipe_path})"
        )
    model = Wav2Vec2ForCTC.from_pretrained(model_dir).to(accelerator.device)
    gc_policy.started()
    started = time.perf_counter()
    try:
        result = evaluate(
            model,
            corpus.test,
            processor,
            accelerator,
            mode=mode,
            max_batch_seconds=recipe.eval.max_batch_seconds,
        )
        # No rank tears its gloo pairs down while a peer still finishes the gather (rank 1 aborted once with
        # "terminate called without an active exception"); training ends the same way (save_final).
        accelerator.wait_for_everyone()
    finally:
        # a gloo group left to the interpreter's exit can abort the process ("terminate called ...")
        accelerator.end_training()
    seconds = time.perf_counter() - started
    if result is None:
        return {}
    ids = corpus.test.column("id")
    return {
        "eval_loss": result.eval_loss,
        "wer": result.wer,
        "eval_samples": result.samples,
        "utterances_per_s": result.samples / seconds,
        "world_size": accelerator.num_processes,
        "utterances": [
            {"id": ids[u.index], "loss": u.loss, "prediction": u.prediction, "reference": u.reference}
            for u in result.utterances
        ],
    }


def main(argv: Sequence[str] | None = None) -> int:
    from asrlaunch.core.console import clean_warnings, error
    from asrlaunch.core.exits import ExitCode
    from asrlaunch.core.recipe import RecipeError
    from asrlaunch.data.corpus import DataError

    parser = argparse.ArgumentParser(
        prog="asrlaunch evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("recipe", help="the recipe whose test split to evaluate on")
    parser.add_argument("--model", required=True, type=Path, help="a saved model folder (a run's final/)")
    parser.add_argument("--mode", choices=["batched", "sequential"], default="batched")
    parser.add_argument("--out", type=Path, help="write one JSON line per utterance (id, loss, prediction)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. data.dir=...")
    args = parser.parse_intermixed_args(argv)
    clean_warnings()
    try:
        summary = evaluate_saved_model(args.recipe, args.model, args.overrides, args.mode)
    except (RecipeError, DataError, ValueError, OSError) as problem:
        error(problem)
        return ExitCode.USAGE
    if summary:
        utterances = summary.pop("utterances")
        if args.out:
            args.out.write_text("".join(json.dumps(u) + "\n" for u in utterances))
        print(json.dumps(summary), flush=True)
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
