"""wav2vec2-base-sized training on one GPU: samples/s and peak memory, fp16 AMP, global batch 32.

The model is built from wav2vec2-base's config (random init, 94M parameters, no download) and trained by the
engine itself (`asrlaunch train recipes/timit32.yaml`) for ~50 steps on a generated corpus with
TIMIT's length distribution (0.9-7.8 s, mean ~3.1 s), for each micro-batch size given (accumulation makes up
the rest of the 32). One prepared script for a lent GPU machine:

    python bench/gpu_base.py                       # on the GPU: micro-batch 32, 16 and 8, 50 steps each
    python bench/gpu_base.py --tiny --steps 4      # anywhere: the smoke model, to check the script runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from asrlaunch.core.logs import read_run_logs
from asrlaunch.core.records import Kind
from asrlaunch.data.synth import WORDS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def timit_seconds(rng: np.random.Generator, count: int) -> np.ndarray:
    """Utterance lengths in seconds like TIMIT's (mean ~3.1 s, 0.9-7.8 s)."""
    return np.clip(rng.lognormal(np.log(3.0), 0.3, count), 0.9, 7.8)


def write_corpus(root: Path, train: int, test: int, seed: int = 0) -> Path:
    """TIMIT layout, RIFF WAV, noise at TIMIT-like lengths: what a throughput benchmark needs, quickly."""
    import soundfile

    rng = np.random.default_rng(seed)
    for split, count in (("TRAIN", train), ("TEST", test)):
        for index in range(count):
            seconds = float(timit_seconds(rng, 1)[0])
            folder = root / split / f"DR{index % 8 + 1}" / f"M{split[:2]}{index // 10:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            audio = rng.normal(0, 0.1, int(seconds * 16000)).astype(np.float32)
            soundfile.write(folder / f"SX{index % 10}.WAV", audio, 16000, format="WAV", subtype="PCM_16")
            text = " ".join(rng.choice(WORDS, size=max(2, int(seconds * 2.5))))
            (folder / f"SX{index % 10}.TXT").write_text(f"0 {len(audio)} {text}\n")
    return root


def train(work: Path, corpus: Path, micro: int, steps: int, tiny: bool) -> dict[str, float]:
    run_dir = work / f"micro{micro}"
    model = [] if tiny else ["model.config={}", "model.freeze_feature_encoder=true"]
    if tiny:
        smoke = (ROOT / "recipes" / "smoke.yaml").read_text()
        model = [f"model.config={json.dumps(_smoke_config(smoke))}", "train.mixed_precision=no"]
    started = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "asrlaunch",
            "train",
            str(ROOT / "recipes" / "timit32.yaml"),
            "--run-dir",
            str(run_dir),
            f"data.dir={corpus}",
            f"data.cache_dir={work / 'cache'}",
            f"train.max_steps={steps}",
            f"train.max_micro_batch_size={micro}",
            "train.warmup_steps=10",
            "logging.steps=5",
            "eval.steps=100000",
            *model,
        ],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise SystemExit(f"micro-batch {micro} failed:\n{done.stderr[-3000:]}")
    records = [r for r in read_run_logs(run_dir) if r["kind"] == Kind.TRAIN and r["rank"] == 0]
    steady = [r["samples_per_s"] for r in records if r["step"] > 10] or [records[-1]["samples_per_s"]]
    return {
        "samples_per_s": statistics.median(steady),
        "max_memory_gib": max((r.get("max_memory_gib") or 0.0) for r in records),
        "wall_s": time.perf_counter() - started,
    }


def _smoke_config(recipe_text: str) -> dict:
    import yaml

    return dict(yaml.safe_load(recipe_text)["model"]["config"])


def mfu_of(corpus: Path, device: str) -> Callable[[float], str]:
    """MFU of a samples/s figure: the model FLOPs of the corpus's mean utterance (compare_hf.train_flops:
    the frozen conv stack forward only) against the GPU's dense fp16 peak."""
    import soundfile
    from compare_hf import base_config, peak_tflops, train_flops

    peak = peak_tflops(device)
    if peak is None:
        return lambda samples_per_s: "MFU n/a"
    config = base_config()
    lengths = [soundfile.info(path).frames for path in (corpus / "TRAIN").rglob("*.WAV")]
    per_sample = float(np.mean([train_flops(n, config, vocab=32) for n in lengths]))
    return lambda samples_per_s: f"MFU {100 * per_sample * samples_per_s / (peak * 1e12):.2f}%"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--micro", type=int, nargs="+", default=[32, 16, 8])
    parser.add_argument(
        "--tiny", action="store_true", help="the smoke model, fp32: a check that runs on a CPU"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = write_corpus(work / "corpus", train=320, test=4)
        device = "cpu"
        try:
            import torch

            device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        except ImportError:
            pass
        print(
            f"device: {device}; model: {'smoke (tiny)' if args.tiny else 'wav2vec2-base config'}; "
            f"global batch 32; {args.steps} steps; fp16 AMP on a GPU"
        )
        mfu = mfu_of(corpus, "" if args.tiny else device)  # wav2vec2-base's FLOPs; n/a on a CPU
        for micro in args.micro:
            figures = train(work, corpus, micro, args.steps, args.tiny)
            print(
                f"micro-batch {micro:>2} x accum {32 // micro:>2}: "
                f"{figures['samples_per_s']:8.1f} samples/s, "
                f"{mfu(figures['samples_per_s'])}, peak memory {figures['max_memory_gib']:.2f} GiB, "
                f"wall {figures['wall_s']:.0f} s"
            )


if __name__ == "__main__":
    main()
