"""The worker: one process per device, under torchrun, srun, accelerate launch or alone.

python -m asrlaunch.train RECIPE --run-dir DIR [key=value ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from asrlaunch.distenv import adopt_launcher_environment
from asrlaunch.logs import RankLog
from asrlaunch.plan import StepPlan, plan_batch, plan_steps
from asrlaunch.recipe import Recipe, RecipeError, load_recipe


class TrainingDivergedError(RuntimeError):
    """Too many optimizer steps in a row had non-finite gradients."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "asrlaunch" / "prepared"


@dataclass
class Batch:
    input_values: Any
    labels: Any


def collate(rows: Any, indices: np.ndarray, pad_to: int) -> Batch:
    """Zero-pad audio to `pad_to` (the global batch's longest sample) and labels with -100."""
    import torch

    picked = rows[indices.tolist()]
    audio = torch.zeros(len(indices), pad_to)
    label_width = max(len(labels) for labels in picked["labels"])
    labels = torch.full((len(indices), label_width), -100, dtype=torch.long)
    for i, (values, tokens) in enumerate(zip(picked["input_values"], picked["labels"], strict=True)):
        audio[i, : len(values)] = torch.tensor(values)
        labels[i, : len(tokens)] = torch.as_tensor(tokens, dtype=torch.long)
    return Batch(audio, labels)


def versions() -> dict[str, str]:
    import accelerate
    import datasets
    import torch
    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "accelerate": accelerate.__version__,
    }


def ensure_corpus(recipe: Recipe, is_main: bool) -> None:
    """Generate the smoke corpus on first use when the recipe asks for it and `data.dir` is missing."""
    from asrlaunch.data.synth import generate_corpus

    data_dir, spec = Path(recipe.data.dir), recipe.data.generate
    if spec is not None and is_main and not data_dir.exists():
        print(f"generating a {spec.engine} corpus in {data_dir} ({spec.train} train, {spec.test} test)")
        generate_corpus(data_dir, spec.train, spec.test, engine=spec.engine, seed=spec.seed)


def make_accelerator(recipe: Recipe, world_size: int, grad_accum: int) -> Any:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, GradientAccumulationPlugin

    on_cpu = not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=on_cpu,
        mixed_precision="no" if on_cpu else recipe.train.mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=grad_accum, sync_with_dataloader=False
        ),
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=_needs_unused(recipe))],
    )
    if accelerator.num_processes != world_size:
        raise RuntimeError(
            f"WORLD_SIZE says {world_size} processes but accelerate formed a world of "
            f"{accelerator.num_processes}: launch with torchrun/srun, not `accelerate launch --cpu`"
        )
    return accelerator


def _needs_unused(recipe: Recipe) -> bool:
    # layerdrop skips whole layers, so DDP must not wait for their gradients.
    settings = {**(recipe.model.config or {}), **recipe.model.overrides}
    return float(settings.get("layerdrop", 0.0)) > 0


class Trainer:
    """The optimisation loop over the run's global order; one instance per rank."""

    def __init__(self, recipe: Recipe, run_dir: Path) -> None:
        from accelerate.utils import set_seed

        from asrlaunch.data.sampler import GlobalOrder
        from asrlaunch.data.timit import load_corpus
        from asrlaunch.model import build_model, build_optimizer, build_scheduler

        self.recipe, self.run_dir = recipe, run_dir
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.batch_plan = plan_batch(recipe.train.global_batch_size, world, recipe.train.max_micro_batch_size)
        self.accelerator = make_accelerator(recipe, world, self.batch_plan.grad_accum)
        self.rank = self.accelerator.process_index
        with self.accelerator.main_process_first():
            ensure_corpus(recipe, self.accelerator.is_main_process)
            corpus = load_corpus(
                recipe.data.dir,
                recipe.data.cache_dir or default_cache_dir(),
                recipe.data.max_train_samples,
                recipe.data.max_eval_samples,
            )
        self.corpus = corpus
        self.train_rows = corpus.train.with_format("numpy", columns=["input_values", "labels"])
        self.plan: StepPlan = plan_steps(
            self.batch_plan,
            len(corpus.train),
            recipe.train.epochs,
            recipe.train.warmup_steps,
            recipe.train.max_steps,
        )
        self.train_ids = list(corpus.train["id"])
        self.order = GlobalOrder(
            np.asarray(corpus.train["length"]), self.batch_plan.global_batch, recipe.train.seed
        )
        set_seed(recipe.train.seed)
        pad_id = corpus.processor.tokenizer.pad_token_id
        model = build_model(recipe.model, corpus.vocab, pad_id)
        optimizer = build_optimizer(model, recipe.train)
        scheduler = build_scheduler(optimizer, recipe.train, self.plan.total_steps)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self.log = RankLog(run_dir, self.rank)
        self.nonfinite_total = self.nonfinite_in_a_row = 0

    # -- one optimizer step -------------------------------------------------------------------------
    def train_step(self, step: int) -> tuple[float, float, np.ndarray]:
        """Forward/backward over this rank's micro-batches of global step `step`, then one update."""
        from asrlaunch.data.sampler import rank_micro_batches

        accelerator = self.accelerator
        batch = self.order.batch(step)
        pad_to = self.order.pad_length(step)
        losses = []
        grad_norm = float("nan")
        for indices in rank_micro_batches(batch, self.batch_plan, self.rank):
            inputs = collate(self.train_rows, indices, pad_to)
            with accelerator.accumulate(self.model), accelerator.autocast():
                loss = self.model(
                    input_values=inputs.input_values.to(accelerator.device),
                    labels=inputs.labels.to(accelerator.device),
                ).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = self._update()
            losses.append(float(loss.detach()))
        return float(np.mean(losses)), grad_norm, batch

    def _update(self) -> float:
        """Clip, step (unless the gradients are not finite) and schedule; all ranks agree after all-reduce."""
        limit = self.recipe.train.max_grad_norm or float("inf")
        norm = float(self.accelerator.clip_grad_norm_(self.model.parameters(), limit))
        finite = bool(np.isfinite(norm))
        if finite or self.accelerator.scaler is not None:  # the fp16 scaler skips overflowing steps itself
            self.optimizer.step()
        skipped = not finite or self.accelerator.optimizer_step_was_skipped
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_total += int(skipped)
        self.nonfinite_in_a_row = self.nonfinite_in_a_row + 1 if skipped else 0
        if self.nonfinite_in_a_row >= self.recipe.train.max_consecutive_nonfinite:
            raise TrainingDivergedError(
                f"{self.nonfinite_in_a_row} optimizer steps in a row had non-finite gradients; lower "
                "train.lr, raise train.warmup_steps or check the data"
            )
        return norm

    # -- the loop ---------------------------------------------------------------------------------------
    def run(self, start_step: int = 0) -> None:
        from asrlaunch.progress import Progress

        plan, recipe = self.plan, self.recipe
        self.write_meta(start_step)
        progress = Progress(plan.total_steps, start_step, enabled=self.accelerator.is_main_process)
        if recipe.eval.at_start and start_step == 0:
            progress.log(self.run_eval(0))
        window: list[float] = []
        window_start = time.perf_counter()
        for step in range(start_step, plan.total_steps):
            loss, grad_norm, batch = self.train_step(step)
            window.append(loss)
            done = step + 1
            if done % recipe.logging.steps == 0 or done == plan.total_steps:
                elapsed = time.perf_counter() - window_start
                record = self.log.write(
                    "train",
                    done,
                    plan.epoch_at(done),
                    loss=round(float(np.mean(window)), 6),
                    lr=self.scheduler.get_last_lr()[0],
                    grad_norm=round(grad_norm, 6),
                    samples_per_s=round(len(window) * plan.batch.global_batch / elapsed, 3),
                    nonfinite_skipped=self.nonfinite_total,
                    **({"sample_ids": self._sample_ids(batch)} if recipe.logging.sample_ids else {}),
                )
                progress.log(record)
                window, window_start = [], time.perf_counter()
            if done % recipe.eval.steps == 0 or done == plan.total_steps:
                eval_start = time.perf_counter()
                progress.log(self.run_eval(done))
                window_start += time.perf_counter() - eval_start  # samples/s counts training time only
            progress.advance(done)
        progress.close()
        self.save_final()

    def _sample_ids(self, batch: np.ndarray) -> list[str]:
        return [self.train_ids[int(i)] for i in batch]

    def run_eval(self, step: int) -> dict[str, Any] | None:
        from asrlaunch.evaluate import evaluate

        result = evaluate(self.model, self.corpus.test, self.corpus.processor, self.accelerator)
        if result is None:
            return None
        return self.log.write(
            "eval",
            step,
            self.plan.epoch_at(step),
            eval_loss=round(result.eval_loss, 6),
            wer=round(result.wer, 6),
            eval_samples=result.samples,
        )

    def write_meta(self, start_step: int) -> None:
        import json

        if self.accelerator.is_main_process:
            (self.run_dir / "plan.json").write_text(json.dumps(self.plan.to_dict(), indent=1) + "\n")
            (self.run_dir / "recipe.yaml").write_text(self.recipe.to_yaml())
        self.log.write(
            "meta",
            start_step,
            self.plan.epoch_at(start_step),
            world_size=self.batch_plan.world_size,
            plan=self.plan.to_dict(),
            versions=versions(),
            recipe=self.recipe.to_dict(),
            device=str(self.accelerator.device),
            resumed_from=start_step or None,
            job_id=os.environ.get("SLURM_JOB_ID"),
            host=os.uname().nodename,
        )

    def save_final(self) -> None:
        """save_pretrained model + processor into <run_dir>/final, written aside and renamed into place."""
        import shutil

        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            final, partial = self.run_dir / "final", self.run_dir / "final.partial"
            shutil.rmtree(partial, ignore_errors=True)
            self.accelerator.unwrap_model(self.model).save_pretrained(partial)
            self.corpus.processor.save_pretrained(partial)
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
        self.accelerator.wait_for_everyone()
        self.log.close()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("--run-dir", required=True, help="run directory (logs/, final/ ...)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.max_steps=10")
    return parser.parse_intermixed_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    run_training(recipe, Path(args.run_dir))
    return 0


def run_training(recipe: Recipe, run_dir: Path) -> None:
    """Train one rank of a run (the caller's process is one task of the world)."""
    adopt_launcher_environment()
    run_dir.mkdir(parents=True, exist_ok=True)
    Trainer(recipe, run_dir).run()


if __name__ == "__main__":
    sys.exit(main())
