"""Evaluation at batch 1 (no padding, as the reference card's eval_batch_size 1), sharded across ranks."""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import jiwer
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from transformers import Wav2Vec2ForCTC, Wav2Vec2Processor


@dataclass(frozen=True)
class EvalResult:
    eval_loss: float
    wer: float
    samples: int


def evaluate(
    model: Wav2Vec2ForCTC,
    table: datasets.Dataset,
    processor: Wav2Vec2Processor,
    accelerator: Accelerator,
    input_dtype: torch.dtype = torch.float32,
) -> EvalResult | None:
    """Greedy CTC decoding of rank r's share (r, r + world, ...); WER computed once, on rank 0.

    Returns the result on rank 0 and None elsewhere.
    """
    rows = table.with_format("numpy", columns=["input_values", "labels", "text"])
    mine = range(accelerator.process_index, len(rows), accelerator.num_processes)
    model.eval()
    outcomes: list[tuple[int, float, str, str]] = []
    with torch.no_grad(), accelerator.autocast():
        for index in mine:
            row = rows[index]
            inputs = torch.as_tensor(row["input_values"], device=accelerator.device, dtype=input_dtype)[None]
            labels = torch.as_tensor(row["labels"], dtype=torch.long, device=accelerator.device)[None]
            output = model(input_values=inputs, labels=labels)
            prediction = processor.batch_decode(output.logits.argmax(dim=-1))[0]
            outcomes.append((index, float(output.loss), prediction, str(row["text"])))
    model.train()
    gathered = sorted(gather_object(outcomes))
    if not accelerator.is_main_process:
        return None
    references = [reference for _, _, _, reference in gathered]
    predictions = [prediction for _, _, prediction, _ in gathered]
    return EvalResult(
        eval_loss=sum(loss for _, loss, _, _ in gathered) / len(gathered),
        wer=float(jiwer.wer(references, predictions)),
        samples=len(gathered),
    )
