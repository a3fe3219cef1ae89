"""Evaluation of a wav2vec2-base-sized model (its config, random init, 94M parameters) on the CPU: the same
utterances batched (masked group norm + attention mask) and one at a time; utterances/s of each, and how far
their results are apart (per-utterance loss, transcripts, WER).

    python bench/eval_base.py [--utterances 32] [--max-batch-seconds 40 160] [--tiny] [--repeat N]

`--repeat N`: one untimed pass of each mode first (first-call costs: allocations, oneDNN kernels for new
shapes), then the median of N timed passes; as in training, where every evaluation after the first is warm.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def main(argv: list[str] | None = None) -> int:
    from accelerate import Accelerator
    from gpu_base import write_corpus  # noise at TIMIT's lengths
    from transformers import Wav2Vec2Config

    from asrlaunch.core.recipe import ModelSection
    from asrlaunch.data.timit import load_corpus
    from asrlaunch.engine.evaluate import evaluate
    from asrlaunch.engine.model import build_model
    from asrlaunch.engine.runtime import keep_freed_host_memory

    keep_freed_host_memory()  # as the evaluation CLI and training do on a CPU

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--utterances", type=int, default=32)
    parser.add_argument("--max-batch-seconds", type=float, nargs="+", default=[40.0, 160.0])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model: checks the script quickly")
    parser.add_argument("--repeat", type=int, default=1, help="timed passes after a warm-up (1: one, cold)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="eval-base-"))
    corpus = load_corpus(write_corpus(work / "corpus", train=8, test=args.utterances), work / "cache")
    config = Wav2Vec2Config().to_dict()  # wav2vec2-base's architecture
    keys = (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "conv_dim",
        "conv_stride",
        "conv_kernel",
        "num_conv_pos_embeddings",
        "num_conv_pos_embedding_groups",
        "feat_extract_norm",
        "do_stable_layer_norm",
    )
    settings = {key: config[key] for key in keys}
    if args.tiny:
        settings.update(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4)
    torch.manual_seed(0)
    model = build_model(
        ModelSection(config=settings), corpus.vocab_size, corpus.processor.tokenizer.pad_token_id
    )
    parameters = sum(p.numel() for p in model.parameters())
    accelerator = Accelerator(cpu=True)
    results = {}
    for mode, seconds in [("sequential", 1.0)] + [("batched", s) for s in args.max_batch_seconds]:
        passes = 1 if args.repeat == 1 else args.repeat + 1
        elapsed = []
        for _ in range(passes):
            started = time.perf_counter()
            result = evaluate(
                model, corpus.test, corpus.processor, accelerator, mode=mode, max_batch_seconds=seconds
            )
            elapsed.append(time.perf_counter() - started)
        assert result is not None
        results[(mode, seconds)] = result
        speed = result.samples / statistics.median(elapsed[-args.repeat :])
        print(f"{mode:>10} (max {seconds:>5.0f} s of audio per batch): {speed:6.2f} utterances/s")
    single = results[("sequential", 1.0)]
    for (mode, seconds), result in results.items():
        if mode == "sequential":
            continue
        pairs = list(zip(result.utterances, single.utterances, strict=True))
        worst = max(abs(a.loss - b.loss) / abs(b.loss) for a, b in pairs)
        same = sum(a.prediction == b.prediction for a, b in pairs)
        print(
            f"batched {seconds:.0f} s vs one at a time: max relative loss difference {worst:.2e}, "
            f"identical transcripts {same}/{len(single.utterances)}, WER {result.wer:.4f} vs {single.wer:.4f}"
        )
    print(f"model: {parameters / 1e6:.1f}M parameters, {args.utterances} utterances")
    return 0


if __name__ == "__main__":
    sys.exit(main())
