"""Where a wav2vec2-base training step goes on one GPU: the device's busy share of the wall time, kernels
launched per step, the kernels and host operations that cost most (torch.profiler over a few steps).

The first H200 run (docs/engine.md) measured ~40 ms per micro-batch whatever its size, plus ~3.4 ms a sample:
host-bound launching, by that fit. This profile says it directly. It times transformers' model in a bare
fp16 step (autocast, GradScaler, fused AdamW, feature encoder frozen, as timit32), not the engine, so it
separates the model's own cost from anything the engine adds (the engine's samples/s is bench/gpu_base.py's).

    python bench/gpu_profile.py               # on the GPU: wav2vec2-base config, micro-batch 32 and 8
    python bench/gpu_profile.py --tiny        # anywhere: a tiny config on the CPU, to check the script runs
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from typing import Any

import numpy as np
import torch
from gpu_base import timit_seconds
from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

TINY: dict[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "conv_dim": [16] * 7,
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 2,
}


def batch(micro: int, rng: np.random.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """Noise at TIMIT's lengths (as bench/gpu_base.py), padded to the longest; ~12 characters a second."""
    seconds = timit_seconds(rng, micro)
    audio = torch.zeros(micro, int(seconds.max() * 16000))
    labels = torch.full((micro, int(seconds.max() * 12)), -100)
    for row, length in enumerate(seconds):
        audio[row, : int(length * 16000)] = torch.randn(int(length * 16000)) * 0.1
        labels[row, : int(length * 12)] = torch.randint(1, 32, (int(length * 12),))
    return {"input_values": audio.to(device), "labels": labels.to(device)}


def profile(micro: int, steps: int, tiny: bool, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    # timit32's model settings: a mean CTC loss (a sum at GradScaler's first scale overflows: skipped steps
    # would be profiled), no dropout
    settings: dict[str, Any] = {"ctc_loss_reduction": "mean", "mask_time_prob": 0.05, "layerdrop": 0.0}
    dropouts = ("attention", "activation", "hidden", "feat_proj", "final")
    settings |= {f"{name}_dropout": 0.0 for name in dropouts}
    config = Wav2Vec2Config(vocab_size=32, **settings, **(TINY if tiny else {}))
    model = Wav2Vec2ForCTC(config)
    torch.nn.Module.to(model, device)  # transformers types its own .to narrowly
    model.freeze_feature_encoder()
    model.train()
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    scaler = torch.amp.GradScaler(enabled=cuda)
    rng = np.random.default_rng(0)
    batches = [batch(micro, rng, device) for _ in range(3)]

    def step(index: int) -> None:
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            loss = model(**batches[index % len(batches)]).loss
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    for index in range(5):  # warm-up: cuDNN's choices, the allocator, the fused optimizer's state
        step(index)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    started = time.perf_counter()
    with torch.profiler.profile(activities=activities) as profiler:
        for index in range(steps):
            step(index)
        if cuda:
            torch.cuda.synchronize()
    wall = (time.perf_counter() - started) / steps
    return summarise(profiler, wall, steps, cuda)


def summarise(profiler: Any, wall: float, steps: int, cuda: bool) -> dict[str, Any]:
    # user annotations (`Optimizer.step#AdamW.step`) have device ranges too: not kernels, as torch's own table
    events = profiler.events()
    kernels = [e for e in events if e.device_type.name == "CUDA" and not e.is_user_annotation]
    device_s = sum(e.device_time for e in kernels) / 1e6 / steps  # microseconds in the trace
    by_kernel: Counter[str] = Counter()
    for event in kernels:
        by_kernel[event.name[:70]] += event.device_time / 1e3 / steps
    host = sorted(profiler.key_averages(), key=lambda a: a.self_cpu_time_total, reverse=True)
    return {
        "wall_ms": 1e3 * wall,
        "device_busy": device_s / wall if cuda else None,
        "kernels_per_step": len(kernels) / steps,
        "top_kernels_ms": by_kernel.most_common(6),
        "top_host_ms": [(a.key, a.self_cpu_time_total / 1e3 / steps) for a in host[:6]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--micro", type=int, nargs="+", default=[32, 8])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="a tiny config on the CPU: checks the script")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    for micro in args.micro:
        figures = profile(micro, args.steps, args.tiny, device)
        busy = "n/a" if figures["device_busy"] is None else f"{100 * figures['device_busy']:.0f}%"
        print(
            f"micro-batch {micro}: {figures['wall_ms']:.1f} ms a step, device busy {busy}, "
            f"{figures['kernels_per_step']:.0f} kernels a step"
        )
        for name, ms in figures["top_kernels_ms"]:
            print(f"  kernel {ms:7.2f} ms  {name}")
        for name, ms in figures["top_host_ms"]:
            print(f"  host   {ms:7.2f} ms  {name}")


if __name__ == "__main__":
    main()
