"""Our engine beside the reference approach (transformers' Trainer, the script's padding collator,
`group_by_length`, evaluation at batch 1): the same prepared corpus, model config, seed, steps and
evaluations, run interleaved N times in one command. Prints medians of whole-run wall time, train
samples/s, evaluation utterances/s and the ratios ours / Trainer, and checks that our batched evaluation
equals our batch-1 one (with --gpu, bench/gpu_checks.py does that under fp16).

    python bench/compare_hf.py               # CPU: tiny group-norm model, espeak corpus 400/100, 100 steps
    python bench/compare_hf.py --procs 2     # the same, two processes each (torchrun, gloo, 1 thread each)
    python bench/compare_hf.py --gpu         # one GPU: wav2vec2-base config, fp16, 60 steps, 2 evals of 200
    python bench/compare_hf.py --gpu --tiny  # the --gpu path with a tiny model and a few steps: anywhere

Both sides run as fresh processes (imports and start-up included in the wall time); the corpus is prepared
once beforehand, so neither pays for decoding audio. MFU counts the model FLOPs of the padded batches (the
conv stack is frozen: forward only) over the training time, against the GPU's dense fp16 peak.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from asrlaunch.core.records import Kind

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

# The CPU comparison: hidden 64, 2 layers, wav2vec2-base's group-norm conv stack at 320x.
TINY_GROUP_NORM = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "conv_dim": [32, 32, 32],
    "conv_stride": [5, 8, 8],
    "conv_kernel": [10, 8, 8],
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 4,
}
# Dense fp16 tensor peaks (TFLOP/s); the first name a device's contains wins (PCIe and NVL H100s are slower).
PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200 NVL": 835.0,
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10": 125.0,
    "V100": 125.0,
}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


# -- model FLOPs -------------------------------------------------------------------------------------------
def conv_frames(samples: int, config: dict[str, Any]) -> list[int]:
    frames, out = samples, []
    for kernel, stride in zip(config["conv_kernel"], config["conv_stride"], strict=True):
        frames = (frames - kernel) // stride + 1
        out.append(frames)
    return out


def train_flops(samples: int, config: dict[str, Any], vocab: int) -> float:
    """Training FLOPs of one utterance of `samples` audio: the frozen conv stack forward only, everything
    after it forward and backward (3x forward)."""
    dims = [1, *config["conv_dim"]]
    frames = conv_frames(samples, config)
    conv = sum(
        2 * k * dims[i] * dims[i + 1] * t
        for i, (k, t) in enumerate(zip(config["conv_kernel"], frames, strict=True))
    )
    t, d, ff = frames[-1], config["hidden_size"], config["intermediate_size"]
    groups, width = config["num_conv_pos_embedding_groups"], config["num_conv_pos_embeddings"]
    rest = 2 * dims[-1] * d * t + 2 * width * (d // groups) * d * t + 2 * d * vocab * t
    rest += config["num_hidden_layers"] * (8 * d * d * t + 4 * t * t * d + 4 * d * ff * t)
    return conv + 3 * rest


def base_config() -> dict[str, Any]:
    """wav2vec2-base's architecture (Wav2Vec2Config's defaults), in the fields the comparison sets."""
    from transformers import Wav2Vec2Config

    base = Wav2Vec2Config().to_dict()
    return {k: base[k] for k in [*TINY_GROUP_NORM, "feat_extract_norm", "do_stable_layer_norm"]}


def model_config(args: argparse.Namespace) -> dict[str, Any]:
    return base_config() if args.gpu and not args.tiny else dict(TINY_GROUP_NORM)


def peak_tflops(device_name: str) -> float | None:
    """The GPU's dense fp16 peak, known by its name."""
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)


def run_side_process(args: argparse.Namespace, command: list[str]) -> subprocess.CompletedProcess[str]:
    """One side's run. On a GPU its output goes on to this command's (bench/gpu.sh's log): a section stopped
    at its time limit still shows how far each side got."""
    if args.gpu:
        return subprocess.run(command, env=environment(args), stdout=sys.stderr, text=True)
    return subprocess.run(command, env=environment(args), capture_output=True, text=True)


# -- our engine ----------------------------------------------------------------------------------------------
def run_ours(args: argparse.Namespace, corpus: Path, work: Path, index: int) -> dict[str, Any]:
    from asrlaunch.core.logs import read_run_logs

    run_dir = work / f"ours-{index}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a finished run of an earlier --work would exit at once
    command = [
        *launcher(args),
        "-m",
        "asrlaunch",
        "train",
        str(ROOT / "recipes" / "timit32.yaml"),
        "--run-dir",
        str(run_dir),
        *common_overrides(args, corpus, work),
        f"eval.mode={args.eval_mode}",
    ]
    started = time.perf_counter()
    done = run_side_process(args, command)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"our engine failed:\n{(done.stderr or '')[-3000:]}")
    records = read_run_logs(run_dir)
    trains = [r for r in records if r["kind"] == Kind.TRAIN and r["rank"] == 0]
    evals = [r for r in records if r["kind"] == Kind.EVAL]
    return {
        "wall_s": wall,
        "train_samples_per_s": 32 * trains[-1]["step"] / train_seconds(trains),
        "eval_utterances_per_s": statistics.median(r["eval_samples"] / r["eval_seconds"] for r in evals),
        "eval_loss": evals[-1]["eval_loss"],
        "wer": evals[-1]["wer"],
        "max_memory_gib": max((r.get("max_memory_gib", 0.0) for r in trains), default=0.0),
        "run_dir": str(run_dir),
    }


def launcher(args: argparse.Namespace) -> list[str]:
    """Python itself for one process, torchrun for more (both sides alike)."""
    if args.procs == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.procs}"]


def environment(args: argparse.Namespace) -> dict[str, str]:
    """One thread per process when several share the cores (torchrun's default), all cores for one."""
    return {**ENV, "OMP_NUM_THREADS": "1"} if args.procs > 1 else ENV


def train_seconds(trains: list[dict[str, Any]]) -> float:
    """Training time from the train records: each covers the steps since the one before at its samples/s."""
    previous, total = 0, 0.0
    for record in trains:
        total += (record["step"] - previous) * 32 / record["samples_per_s"]
        previous = record["step"]
    return total


def common_overrides(args: argparse.Namespace, corpus: Path, work: Path) -> list[str]:
    return [
        f"data.dir={corpus}",
        f"data.cache_dir={work / 'cache'}",
        f"data.max_eval_samples={args.eval_samples}",
        f"model.config={json.dumps(model_config(args))}",
        f"model.freeze_feature_encoder={str(args.gpu and not args.tiny).lower()}",
        f"train.max_steps={args.steps}",
        f"train.max_micro_batch_size={args.micro}",
        "train.warmup_steps=10",
        f"train.mixed_precision={'fp16' if args.gpu else 'no'}",
        f"eval.steps={args.eval_every}",
        f"logging.steps={args.logging_steps}",
        "logging.report_to=[none]",  # as the Trainer's report_to=[]
        "checkpoint.save_steps=null",
    ]


def evaluate_both_modes(args: argparse.Namespace, corpus: Path, work: Path, run_dir: str) -> dict[str, Any]:
    """Our final model evaluated batched and at batch 1: speed and equality."""
    out = {}
    for mode in ("sequential", "batched"):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "asrlaunch",
                "evaluate",
                str(ROOT / "recipes" / "timit32.yaml"),
                "--model",
                f"{run_dir}/final",
                "--mode",
                mode,
                "--out",
                str(work / f"{mode}.jsonl"),
                *common_overrides(args, corpus, work),
            ],
            env=ENV,
            capture_output=True,
            text=True,
        )
        if done.returncode:
            raise SystemExit(f"evaluation ({mode}) failed:\n{done.stderr[-3000:]}")
        out[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    pairs = zip(*(map(json.loads, (work / f"{m}.jsonl").read_text().splitlines()) for m in out), strict=True)
    worst = max(abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in pairs)
    out["max_relative_loss_difference"] = worst
    return out


# -- the reference approach ---------------------------------------------------------------------------------
def run_trainer(args: argparse.Namespace, corpus: Path, work: Path, index: int) -> dict[str, Any]:
    return run_side(args, __file__, "trainer", corpus, work, index)


def run_side(
    args: argparse.Namespace, script: str, side: str, corpus: Path, work: Path, index: int
) -> dict[str, Any]:
    """The other side of a comparison: `script --side SIDE` in fresh processes, launched as ours is, with this
    command's options; the result file its rank 0 writes, and the whole run's wall time."""
    out = work / f"{side}-{index}.json"
    command = [*launcher(args), script, "--side", side, "--result", str(out), *sys.argv[1:]]
    command += ["--corpus", str(corpus), "--work", str(work)]
    started = time.perf_counter()
    done = run_side_process(args, command)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"the {side} side failed:\n{(done.stderr or '')[-3000:]}")
    return {"wall_s": wall, **json.loads(out.read_text())}


Run = Callable[[argparse.Namespace, Path, Path, int], dict[str, Any]]


def interleaved(
    args: argparse.Namespace, corpus: Path, work: Path, sides: dict[str, Run]
) -> dict[str, list[dict[str, Any]]]:
    """`args.runs` runs of each side, alternating which goes first, so that a drift of the machine's speed
    within the sitting falls on both."""
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    order = list(sides.items())
    for index in range(args.runs):
        for name, run in order if index % 2 == 0 else order[::-1]:
            results[name].append(run(args, corpus, work, index))
            print(f"run {index} {name}: {json.dumps(results[name][-1])}", flush=True)
    return results


# -- the comparison ------------------------------------------------------------------------------------------
def make_corpus(args: argparse.Namespace, root: Path) -> Path:
    corpus = root / "corpus"
    if corpus.exists():
        return corpus
    if args.gpu:
        from gpu_base import write_corpus  # noise at TIMIT's lengths

        return write_corpus(corpus, train=max(args.steps * 32, 64), test=args.eval_samples)
    from asrlaunch.data.synth import generate_corpus

    return generate_corpus(corpus, args.train, args.test, engine=args.engine, seed=0)


def prepare(args: argparse.Namespace, corpus: Path, work: Path) -> int:
    from asrlaunch.data.timit import load_corpus

    prepared = load_corpus(corpus, work / "cache", None, args.eval_samples, "reference")
    return len(prepared.vocab)


def mfu(args: argparse.Namespace, work: Path, samples_per_s: float, vocab: int) -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or peak_tflops(name)
    if peak is None:
        return None
    from asrlaunch.data.timit import load_corpus

    lengths = load_corpus(Path(work / "corpus"), work / "cache", None, None, "reference").train.numbers(
        "length"
    )
    per_sample = np.mean([train_flops(int(n), model_config(args), vocab) for n in lengths])
    return float(per_sample * samples_per_s / (peak * 1e12))


def summary(runs: list[dict[str, Any]]) -> dict[str, float]:
    keys = ("wall_s", "train_samples_per_s", "eval_utterances_per_s", "eval_loss", "wer", "max_memory_gib")
    return {key: statistics.median(r[key] for r in runs) for key in keys}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The comparison's options, with the defaults of its mode filled in (bench/step_floor.py shares them)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3, help="interleaved runs of each side (medians printed)")
    parser.add_argument("--gpu", action="store_true", help="wav2vec2-base config, fp16, on the GPU")
    parser.add_argument(
        "--tiny", action="store_true", help="with --gpu: a tiny model and few steps (any machine)"
    )
    parser.add_argument("--steps", type=int)
    parser.add_argument("--eval-every", type=int)
    parser.add_argument("--eval-samples", type=int)
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--micro", type=int, default=32, help="micro-batch (accumulation makes up 32)")
    parser.add_argument("--procs", type=int, default=1, help="processes per side (torchrun, gloo)")
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--engine", default="auto", help="corpus generator engine (CPU mode)")
    parser.add_argument("--eval-mode", default="batched", choices=["batched", "sequential"])
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense fp16 peak (default: by its name)")
    parser.add_argument("--work", help="working folder (default: a temporary one)")
    parser.add_argument("--side", choices=["trainer"], help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    gpu_full = args.gpu and not args.tiny
    args.steps = args.steps or (60 if gpu_full else 4 if args.gpu else 100)
    args.eval_every = args.eval_every or (30 if gpu_full else 2 if args.gpu else 50)
    args.eval_samples = args.eval_samples or (200 if gpu_full else 16 if args.gpu else args.test)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gpu_full = args.gpu and not args.tiny
    if args.side == "trainer":
        from hf_trainer_side import trainer_side

        trainer_side(args)
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="compare-hf-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = make_corpus(args, work)
    vocab = prepare(args, corpus, work)
    results = interleaved(args, corpus, work, {"ours": run_ours, "trainer": run_trainer})
    ours = results["ours"]
    a, b = summary(ours), summary(results["trainer"])
    report: dict[str, Any] = {
        "setup": {
            k: getattr(args, k)
            for k in ("gpu", "tiny", "steps", "eval_every", "eval_samples", "runs", "micro", "procs")
        },
        "ours": a,
        "trainer": b,
        "ratio_wall_ours_over_trainer": a["wall_s"] / b["wall_s"],
        "ratio_train_samples_per_s": a["train_samples_per_s"] / b["train_samples_per_s"],
        "ratio_eval_utterances_per_s": a["eval_utterances_per_s"] / b["eval_utterances_per_s"],
        "train_mfu_ours": mfu(args, work, a["train_samples_per_s"], vocab),
        "train_mfu_trainer": mfu(args, work, b["train_samples_per_s"], vocab),
    }
    if not gpu_full:  # on a GPU, bench/gpu_checks.py compares the two modes under fp16 (bench/gpu.sh)
        report.update(modes_report(evaluate_both_modes(args, corpus, work, ours[-1]["run_dir"])))
    print(json.dumps(report, indent=1))
    return 0


def modes_report(modes: dict[str, Any]) -> dict[str, Any]:
    return {
        "batched_over_batch1_eval_speed": modes["batched"]["utterances_per_s"]
        / modes["sequential"]["utterances_per_s"],
        "batched_vs_batch1": {
            "eval_loss": [modes["batched"]["eval_loss"], modes["sequential"]["eval_loss"]],
            "wer": [modes["batched"]["wer"], modes["sequential"]["wer"]],
            "max_relative_loss_difference": modes["max_relative_loss_difference"],
        },
    }


if __name__ == "__main__":
    sys.exit(main())
