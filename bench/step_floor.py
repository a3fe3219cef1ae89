"""How far the engine's training is from a bare loop: bench/compare_hf.py's CPU run (tiny group-norm model,
espeak corpus 400/100, 100 steps at global batch 32) by the engine, and the same model on the same padded
micro-batches in a plain loop of torch's DDP: forward, backward, clip, AdamW, schedule, nothing else (no
accelerate, metrics, heartbeats, stop agreement, logging or evaluation). Prints the training time of each
(medians of interleaved runs) and ours over the bare loop's: what the engine adds to a step.

    python bench/step_floor.py               # 2 gloo processes (torchrun, 1 thread each)
    python bench/step_floor.py --procs 1     # 1 process, all cores

Options after the script's own are bench/compare_hf.py's (--steps, --micro, --work, ...).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import compare_hf

from asrlaunch.core.logs import read_run_logs
from asrlaunch.core.records import Kind

ROOT = Path(__file__).resolve().parents[1]


def bare_loop(args: argparse.Namespace, corpus: Path, work: Path) -> dict[str, float]:
    """One rank of the bare loop; the engine's model, optimizer, schedule and collation."""
    import torch
    import torch.distributed as dist

    from asrlaunch.core.plan import plan_batch
    from asrlaunch.core.recipe import load_recipe
    from asrlaunch.data.prepare import prepare_corpus
    from asrlaunch.engine.batches import TrainData
    from asrlaunch.engine.model import build_model, build_optimizer, build_scheduler
    from asrlaunch.engine.runtime import keep_freed_host_memory

    keep_freed_host_memory()  # a process setting of the engine's, part of what a step costs on a CPU
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    overrides = compare_hf.common_overrides(args, corpus, work)
    recipe = load_recipe(ROOT / "recipes" / "timit32.yaml", overrides)
    prepared = prepare_corpus(recipe)
    torch.manual_seed(recipe.train.seed)
    model = build_model(recipe.model, prepared.vocab_size, prepared.processor.tokenizer.pad_token_id)
    model.train()
    optimizer = build_optimizer(model, recipe.train)
    scheduler = build_scheduler(optimizer, recipe.train, args.steps)
    net: Any = model
    if world > 1:
        dist.init_process_group("gloo")
        net = torch.nn.parallel.DistributedDataParallel(model)
    data = TrainData(prepared, 32, recipe.train.seed, recipe.data.order)
    plan = plan_batch(32, world, args.micro)
    step_seconds, started = 0.0, time.perf_counter()
    for step in range(args.steps):
        step_started = time.perf_counter()
        batches = data.micro_batches(step, plan, rank)
        for index, batch in enumerate(batches):
            last = index == len(batches) - 1
            with net.no_sync() if world > 1 and not last else contextlib.nullcontext():
                loss = net(input_values=batch.input_values, labels=batch.labels).loss
                (loss * batch.weight / plan.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.train.max_grad_norm or float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_seconds += time.perf_counter() - step_started
    return {"train_s": step_seconds, "loop_s": time.perf_counter() - started}


def run_bare(args: argparse.Namespace, corpus: Path, work: Path, index: int) -> dict[str, Any]:
    return compare_hf.run_side(args, __file__, "bare", corpus, work, index)


def run_engine(args: argparse.Namespace, corpus: Path, work: Path, index: int) -> dict[str, Any]:
    """The engine's training time (its step times, as its train records give them) and its loop time:
    the start record to the last train record, less the evaluations in between."""
    run_dir = Path(compare_hf.run_ours(args, corpus, work, index)["run_dir"])
    records = [r for r in read_run_logs(run_dir) if r["rank"] == 0]
    trains = [r for r in records if r["kind"] == Kind.TRAIN]
    start = next(r["time"] for r in records if r["kind"] == Kind.META)
    evals = sum(
        r["eval_seconds"] for r in records if r["kind"] == Kind.EVAL and r["time"] < trains[-1]["time"]
    )
    return {"train_s": compare_hf.train_seconds(trains), "loop_s": trains[-1]["time"] - start - evals}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--side", choices=["bare"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    own, rest = parser.parse_known_args()
    given_procs = any(option.startswith("--procs") for option in rest)
    args = compare_hf.parse_args(rest if given_procs else [*rest, "--procs", "2"])
    if args.gpu:
        parser.error("the bare loop runs on the CPU only: drop --gpu")
    if own.side == "bare":
        result = bare_loop(args, Path(args.corpus), Path(args.work))
        if int(os.environ.get("RANK", "0")) == 0:
            Path(own.result).write_text(json.dumps(result))
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="step-floor-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = compare_hf.make_corpus(args, work)
    compare_hf.prepare(args, corpus, work)
    sides = compare_hf.interleaved(args, corpus, work, {"engine": run_engine, "bare": run_bare})
    medians = {
        name: {k: statistics.median(r[k] for r in runs) for k in ("train_s", "loop_s")}
        for name, runs in sides.items()
    }
    report = {
        "setup": {"procs": args.procs, "steps": args.steps, "micro": args.micro, "runs": args.runs},
        **medians,
        "engine_over_bare_train": medians["engine"]["train_s"] / medians["bare"]["train_s"],
        "engine_over_bare_loop": medians["engine"]["loop_s"] / medians["bare"]["loop_s"],
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
