"""The reference side of bench/compare_hf.py, in its own process (`compare_hf.py --side trainer`):
transformers' Trainer set up as run_speech_recognition_ctc.py sets it up, on the prepared corpus."""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np
from compare_hf import model_config


def trainer_side(args: argparse.Namespace) -> None:
    """In its own process: transformers' Trainer as run_speech_recognition_ctc.py sets it up."""
    import datasets
    import jiwer
    import torch
    from transformers import Trainer, TrainingArguments, Wav2Vec2Config, Wav2Vec2ForCTC

    from asrlaunch.data.timit import load_corpus

    work, corpus = Path(args.work), Path(args.corpus)
    prepared = load_corpus(corpus, work / "cache", None, args.eval_samples, "reference")
    processor = prepared.processor
    config = Wav2Vec2Config(
        **model_config(args),
        vocab_size=len(processor.tokenizer),  # as the script: <s>, </s> counted
        pad_token_id=processor.tokenizer.pad_token_id,
        ctc_loss_reduction="mean",
        ctc_zero_infinity=False,
        mask_time_prob=0.05,
        layerdrop=0.0,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        feat_proj_dropout=0.0,
        final_dropout=0.0,
    )
    torch.manual_seed(42)
    model = Wav2Vec2ForCTC(config)
    if args.gpu and not args.tiny:
        model.freeze_feature_encoder()

    def collate(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:  # DataCollatorCTCWithPadding
        batch = processor.feature_extractor.pad(
            [{"input_values": f["input_values"]} for f in features], padding="longest", return_tensors="pt"
        )
        labels = processor.tokenizer.pad([{"input_ids": f["labels"]} for f in features], return_tensors="pt")
        batch["labels"] = labels["input_ids"].masked_fill(labels.attention_mask.ne(1), -100)
        return dict(batch)

    def metrics(prediction: Any) -> dict[str, float]:
        ids = np.argmax(prediction.predictions, axis=-1)
        label_ids = prediction.label_ids.copy()
        label_ids[label_ids == -100] = processor.tokenizer.pad_token_id
        words = processor.batch_decode(ids)
        references = processor.batch_decode(label_ids, group_tokens=False)
        return {"wer": float(jiwer.wer(references, words))}

    # transformers 5 spells group_by_length as a sampling strategy
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    grouping: dict[str, Any] = (
        {"train_sampling_strategy": "group_by_length"}
        if "train_sampling_strategy" in fields
        else {"group_by_length": True}
    )
    # Its default (on since mid-2025) multiplies a mean loss such as CTC's by the process count: on two
    # processes its eval loss came out 2x ours (transformers#35078); the card's version had no such thing.
    if "average_tokens_across_devices" in fields:
        grouping["average_tokens_across_devices"] = False
    training = TrainingArguments(
        **grouping,
        output_dir=str(work / "trainer-out"),
        per_device_train_batch_size=min(args.micro, 32 // args.procs),
        gradient_accumulation_steps=32 // args.procs // min(args.micro, 32 // args.procs),
        per_device_eval_batch_size=1,
        learning_rate=1e-4,
        warmup_steps=10,
        max_steps=args.steps,
        eval_strategy="steps",
        eval_steps=args.eval_every,
        logging_steps=args.logging_steps,
        save_strategy="no",
        length_column_name="length",
        fp16=args.gpu,
        seed=42,
        report_to=[],
        dataloader_num_workers=0,
        use_cpu=not args.gpu,
        weight_decay=0.005,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=model,
        args=training,
        data_collator=collate,
        compute_metrics=metrics,
        train_dataset=datasets.Dataset.from_file(str(prepared.train.path)),  # the same prepared table
        eval_dataset=datasets.Dataset.from_file(str(prepared.test.path)),
    )
    trainer.train()
    history = trainer.state.log_history
    evals = [h for h in history if "eval_loss" in h]
    train_runtime = next(h["train_runtime"] for h in history if "train_runtime" in h)
    eval_runtime = sum(h["eval_runtime"] for h in evals)
    if not trainer.is_world_process_zero():
        return
    Path(args.result).write_text(
        json.dumps(
            {
                "train_samples_per_s": args.steps * 32 / (train_runtime - eval_runtime),
                "eval_utterances_per_s": statistics.median(h["eval_samples_per_second"] for h in evals),
                "eval_loss": evals[-1]["eval_loss"],
                "wer": evals[-1]["eval_wer"],
                "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if args.gpu else 0.0,
            }
        )
    )
