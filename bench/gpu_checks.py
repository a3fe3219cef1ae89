"""The GPU acceptance checks beyond speed: is fp16 training, batched evaluation, DeepSpeed, resume and compile
correct there? Each prints a row of a verdict table (figure, verdict).

    python bench/gpu_checks.py            # on one GPU: wav2vec2-base config, fp16 (part of bench/gpu.sh)
    python bench/gpu_checks.py --tiny     # anywhere: the smoke model, fp32, a few steps: the script runs
    python bench/gpu_checks.py --part checks --work W   # then --part compile --work W: bench/gpu.sh's calls

1. batched vs batch-1 evaluation under fp16: identical transcripts (or how many differ), eval loss within 1e-3
   relative, utterances/s of each (a model trained a few steps, saved, evaluated by `asrlaunch evaluate`);
2. DeepSpeed ZeRO-2 in fp16 on one GPU: trains, every loss finite, kill -9 after a checkpoint,
   resumes to the end;
3. one process in fp16 (accelerate without DDP: one GPU): kill -9 after a checkpoint and a resume: the
   learning rates and skipped fp16 steps equal an uninterrupted run's, and the loss curve continues (bitwise
   equal where the GPU path is deterministic; else no farther from it than 3x the spread of two uninterrupted
   runs, or 1e-3 relative: CTC's backward on CUDA is not deterministic);
4. `train.compile` on and off: steady samples/s (steps 11-20) and the losses' agreement (1e-4 relative;
   fp16: 1e-2, or 3x the spread of two eager runs).

Checks 1-3 and the second eager run of 4 run side by side (samples/s is not their figure; batched vs batch-1
utterances/s is measured under the same load); 4's eager and compiled runs run alone (`--part compile`).
Only the resumed runs save checkpoints: each is ~1 GB, hashed and synced.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from asrlaunch.core.logs import read_run_logs
from asrlaunch.core.rundir import RunDir
from asrlaunch.engine.checkpoint import MANIFEST, step_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
Check = Callable[[Path, Path, bool], tuple[str, str]]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def model_overrides(tiny: bool) -> list[str]:
    if tiny:
        return [
            "train.mixed_precision=no",
            "model.config={hidden_size: 32, num_hidden_layers: 2, "
            "num_attention_heads: 2, intermediate_size: 64, conv_dim: [16, 16, 16], conv_stride: [5, 8, 8], "
            "conv_kernel: [10, 8, 8], num_conv_pos_embeddings: 16, num_conv_pos_embedding_groups: 2}",
        ]
    # an empty config is Wav2Vec2Config()'s defaults: wav2vec2-base's architecture, randomly initialised
    return ["model.config={}", "train.mixed_precision=fp16"]


def engine(work: Path, corpus: Path, name: str, tiny: bool, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "asrlaunch",
        "train",
        str(ROOT / "recipes" / "timit32.yaml"),
        "--run-dir",
        str(work / name),
        f"data.dir={corpus}",
        f"data.cache_dir={work / 'cache'}",
        "train.max_micro_batch_size=16",
        "train.warmup_steps=5",
        "logging.steps=1",
        "logging.report_to=[none]",
        "eval.steps=100000",
        "checkpoint.save_steps=100000",
        *model_overrides(tiny),
        *extra,
    ]


def records(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    return [r for r in read_run_logs(run_dir) if r["kind"] == kind]


def run(command: list[str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, env=ENV, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command[:6])} failed:\n{done.stderr[-3000:]}")
    return done


def kill_after_checkpoint(command: list[str], run_dir: Path, step: int) -> None:
    """Run `command` (in a session of its own: kill -9 takes all its processes) until step's checkpoint is
    complete, then kill it; killed as well when anything goes wrong meanwhile (a timeout's SIGTERM too)."""
    manifest = step_dir(RunDir(run_dir).checkpoints, step) / MANIFEST
    process = subprocess.Popen(
        [*command, f"checkpoint.save_steps={step}"],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    LIVE.add(process)
    try:
        while not manifest.exists():
            if process.poll() is not None:
                raise SystemExit("training ended before its checkpoint")
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):  # ended by itself: its own error is the one to show
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        LIVE.discard(process)


LIVE: set[subprocess.Popen[bytes]] = set()  # the killed runs' processes, which a timeout would not reach


def kill_live(signum: int, frame: object) -> None:
    for process in list(LIVE):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    raise SystemExit(128 + signum)


def check_eval(work: Path, corpus: Path, tiny: bool) -> tuple[str, str]:
    run(engine(work, corpus, "eval-model", tiny, "train.max_steps=20"))
    outcomes = {}
    for mode in ("batched", "sequential"):
        out = work / f"{mode}.jsonl"
        done = run(
            [
                sys.executable,
                "-m",
                "asrlaunch",
                "evaluate",
                str(ROOT / "recipes" / "timit32.yaml"),
                "--model",
                str(RunDir(work / "eval-model").final),
                "--mode",
                mode,
                "--out",
                str(out),
                f"data.dir={corpus}",
                f"data.cache_dir={work / 'cache'}",
                *(o for o in model_overrides(tiny) if o.startswith("train.mixed_precision")),
            ]
        )
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        outcomes[mode] = (summary, [json.loads(line) for line in out.read_text().splitlines()])
    (fast, fast_rows), (slow, slow_rows) = outcomes["batched"], outcomes["sequential"]
    differ = sum(a["prediction"] != b["prediction"] for a, b in zip(fast_rows, slow_rows, strict=True))
    relative = abs(fast["eval_loss"] - slow["eval_loss"]) / abs(slow["eval_loss"])
    figure = (
        f"{len(fast_rows) - differ}/{len(fast_rows)} transcripts identical, eval loss rel. diff "
        f"{relative:.1e}; {fast['utterances_per_s']:.1f} vs {slow['utterances_per_s']:.1f} utterances/s"
    )
    return figure, "pass" if relative <= 1e-3 and differ <= max(1, len(fast_rows) // 100) else "FAIL"


def check_deepspeed(work: Path, corpus: Path, tiny: bool) -> tuple[str, str]:
    command = engine(
        work, corpus, "zero2", tiny, "train.max_steps=20", "train.backend=deepspeed", "train.zero_stage=2"
    )
    kill_after_checkpoint(command, work / "zero2", 10)
    resumed = run([*command, "checkpoint.save_steps=10"])
    losses = [r["loss"] for r in records(work / "zero2", "train")]
    finite = all(loss is not None and math.isfinite(loss) for loss in losses)
    ok = finite and "resuming from" in resumed.stdout and RunDir(work / "zero2").is_finished()
    return f"{len(losses)} train records, all finite: {finite}; resumed from step 10 to the end", (
        "pass" if ok else "FAIL"
    )


def check_resume(work: Path, corpus: Path, tiny: bool) -> tuple[str, str]:
    """Killed after step 10's checkpoint and resumed, against an uninterrupted run; a second uninterrupted run
    measures the run-to-run spread (CTC's backward on CUDA is not deterministic: no bitwise repeat there).
    The learning rates and the skipped fp16 steps depend on the scheduler's and the scaler's state only: they
    must be equal whatever the spread (a scaler restored wrong shows there first)."""
    command = engine(work, corpus, "resumed", tiny, "train.max_steps=20")
    with ThreadPoolExecutor(max_workers=3) as pool:
        repeats = [
            pool.submit(run, engine(work, corpus, name, tiny, "train.max_steps=20"))
            for name in ("straight", "control")
        ]
        kill_after_checkpoint(command, work / "resumed", 10)
        run([*command, "checkpoint.save_steps=10"])
        for repeat in repeats:
            repeat.result()
    straight, control, resumed = (losses(work / n) for n in ("straight", "control", "resumed"))
    after = [step for step in straight if step > 10]
    spread = max(relative(straight[s], control[s]) for s in after)
    worst = max(relative(straight[s], resumed[s]) for s in after)
    first = relative(straight[11], resumed[11])
    schedule = [schedule_of(work / n) for n in ("straight", "control", "resumed")]
    same_schedule = schedule[2] == schedule[0] or schedule[1] != schedule[0]  # unless it varies run to run
    how = "bitwise equal" if worst == 0 else f"max rel. diff {worst:.1e} (step 11: {first:.1e})"
    figure = (
        f"steps 11-20 after the resume: {how}; two uninterrupted runs: {spread:.1e}; "
        f"learning rates and skipped fp16 steps {'equal' if schedule[2] == schedule[0] else 'DIFFERENT'}"
    )
    # Resumed state is exact when the resumed run is no farther from the uninterrupted one than a repeat is.
    return figure, "pass" if same_schedule and worst <= max(1e-3, 3 * spread) else "FAIL"


def schedule_of(run_dir: Path) -> list[tuple[int, float, int]]:
    """(step, learning rate, skipped fp16 steps so far) of steps 11-20."""
    trains = records(run_dir, "train")  # a killed attempt's steps come again after the resume: the last wins
    kept = {r["step"]: (r["step"], r["lr"], r.get("nonfinite_skipped", 0)) for r in trains if r["step"] > 10}
    return [kept[step] for step in sorted(kept)]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir, "train")}


def relative(a: float, b: float) -> float:
    return abs(a - b) / abs(a)


def compile_run(work: Path, corpus: Path, tiny: bool, name: str, compiled: bool) -> None:
    # SpecAugment off: compiled, its masks are other random draws than eager's
    options = (
        "train.max_steps=20",
        f"train.compile={str(compiled).lower()}",
        "model.overrides.mask_time_prob=0",
    )
    run(engine(work, corpus, name, tiny, *options))


def check_compile(work: Path, corpus: Path, tiny: bool) -> tuple[str, str]:
    """Eager and compiled, each alone (their samples/s, steps 11-20, are the figure); a second eager run, made
    beside the other checks (or here, when they did not run), gives the run-to-run spread that the compiled
    losses are held to (as the resume check)."""
    if not RunDir(work / "eager-control").is_finished():  # not run, failed, or stopped at the last limit
        shutil.rmtree(work / "eager-control", ignore_errors=True)
        compile_run(work, corpus, tiny, "eager-control", False)
    results = {}
    for name, compiled in (("eager", False), ("compiled", True)):
        compile_run(work, corpus, tiny, name, compiled)
        trains = records(work / name, "train")
        results[name] = (
            [r["loss"] for r in trains],
            statistics.median(32 / r["step_s"] for r in trains[10:]),
        )
        print(f"compile: {name} {results[name][1]:.1f} samples/s (steps 11-20)", flush=True)
    (eager_losses, eager_speed), (compiled_losses, compiled_speed) = results["eager"], results["compiled"]
    worst = max(relative(a, b) for a, b in zip(eager_losses, compiled_losses, strict=True))
    control = [r["loss"] for r in records(work / "eager-control", "train")]
    spread = max(relative(a, b) for a, b in zip(eager_losses, control, strict=True))
    tolerance = 1e-4 if tiny else 1e-2  # fp16 autocast: fused kernels round differently
    figure = (
        f"{eager_speed:.1f} vs {compiled_speed:.1f} samples/s (eager vs compiled); "
        f"loss rel. diff {worst:.1e}, two eager runs {spread:.1e}"
    )
    return figure, "pass" if worst <= max(tolerance, 3 * spread) else "FAIL"


Row = tuple[str, str, str, float]


def timed(check: Check, work: Path, corpus: Path, tiny: bool) -> tuple[str, str, float]:
    started = time.perf_counter()
    try:
        figure, verdict = check(work, corpus, tiny)
    except (SystemExit, Exception) as problem:  # one check's failure leaves the others' rows standing
        figure, verdict = last_line(problem), "ERROR"
    return figure, verdict, time.perf_counter() - started


def last_line(problem: BaseException) -> str:
    return (str(problem).splitlines() or [repr(problem)])[-1][:150]


def report(name: str, outcome: tuple[str, str, float]) -> Row:
    figure, verdict, seconds = outcome
    print(f"{name}: {figure} -> {verdict}", flush=True)
    return name, figure, verdict, seconds


def side_by_side(work: Path, corpus: Path, tiny: bool, with_control: bool) -> list[Row]:
    """Checks 1-3 at once (their processes use a fraction of one GPU), and compile's second eager run; each
    row printed as its check ends, so that a section stopped at its time limit keeps the finished ones."""
    checks: dict[str, Check] = {"eval": check_eval, "deepspeed": check_deepspeed, "resume": check_resume}
    with ThreadPoolExecutor(max_workers=len(checks) + 1) as pool:
        futures = {pool.submit(timed, check, work, corpus, tiny): name for name, check in checks.items()}
        control = (
            pool.submit(compile_run, work, corpus, tiny, "eager-control", False) if with_control else None
        )
        rows = [report(futures[future], future.result()) for future in as_completed(futures)]
    if control is not None and control.exception() is not None:
        print(f"compile's second eager run failed (the compile part runs it again): {control.exception()}")
    return sorted(rows, key=lambda row: list(checks).index(row[0]))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tiny", action="store_true", help="the smoke-sized model in fp32: checks the script"
    )
    parser.add_argument(
        "--part", choices=["all", "checks", "compile"], default="all", help="checks 1-3, compile, or both"
    )
    parser.add_argument("--work", help="the folder of the runs (one for both parts; default: a new one)")
    args = parser.parse_args()
    from gpu_base import write_corpus

    signal.signal(signal.SIGTERM, kill_live)  # `timeout` ends the section: no run is left behind
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu-checks-"))
    corpus = work / "corpus"
    if not corpus.exists():  # the second part reuses the first's corpus (and its prepared cache)
        write_corpus(work / "corpus.partial", train=160, test=32).rename(corpus)
    rows = []
    if args.part in ("all", "checks"):
        rows += side_by_side(work, corpus, args.tiny, with_control=True)
    if args.part in ("all", "compile"):
        rows.append(report("compile", timed(check_compile, work, corpus, args.tiny)))
    print("\n| check | figure | verdict | seconds |\n|---|---|---|---:|")
    for name, figure, verdict, seconds in rows:
        print(f"| {name} | {figure} | {verdict} | {seconds:.0f} |")
    return 0 if all(row[2] == "pass" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
