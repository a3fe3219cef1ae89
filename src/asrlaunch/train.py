"""The worker: one process per device, under torchrun, srun, accelerate launch or alone.

    python -m asrlaunch.train RECIPE --run-dir DIR [key=value ...]

Every start resumes from the newest complete checkpoint of the run directory; a finished run exits at once.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from asrlaunch import checkpoint
from asrlaunch.data.timit import DataError
from asrlaunch.distenv import adopt_launcher_environment
from asrlaunch.logs import RankLog, next_attempt, rank_log_path, slurm_restart_count
from asrlaunch.plan import BatchPlanError, StepPlan, plan_batch, plan_steps
from asrlaunch.recipe import Recipe, RecipeError, load_recipe
from asrlaunch.signals import JobInterrupted, StopRequest, classify_stop, requeue_job

DONE_MARKER = "trainer_state.json"  # in final/: the run reached its last step


class TrainingDivergedError(RuntimeError):
    """Too many optimizer steps in a row had non-finite gradients."""


class RequeueLimitError(RuntimeError):
    """The job was restarted more often than cluster.max_requeues allows."""


class Trainer:
    """The optimisation loop over the run's global order; one instance per rank."""

    def __init__(self, recipe: Recipe, run_dir: Path, stop: StopRequest | None = None) -> None:
        from accelerate.utils import broadcast_object_list, set_seed

        from asrlaunch.data.sampler import GlobalOrder
        from asrlaunch.data.timit import load_corpus
        from asrlaunch.model import build_model, build_optimizer, build_scheduler, ctc_min_frames
        from asrlaunch.runtime import (
            default_cache_dir,
            ensure_corpus,
            input_dtype,
            load_universal_checkpoints,
            make_accelerator,
        )

        self.recipe, self.run_dir = recipe, run_dir
        self.stop = stop if stop is not None else StopRequest()  # falsy until signalled
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.batch_plan = plan_batch(recipe.train.global_batch_size, world, recipe.train.max_micro_batch_size)
        self.accelerator = accelerator = make_accelerator(recipe, self.batch_plan)
        self.input_dtype = input_dtype(accelerator)
        self.rank = accelerator.process_index
        # Rank 0 decides the attempt and the verified checkpoint to resume from, so every rank agrees;
        # before `prepare`, because ZeRO shards of another world size need DeepSpeed's universal loader.
        decided: list[Any] = [None, None, None]
        if accelerator.is_main_process:
            found = checkpoint.newest_complete(self.checkpoints)
            decided = [
                next_attempt(rank_log_path(run_dir, 0)),
                str(found[0]) if found else None,
                found[1].get("world_size") if found else None,
            ]
        broadcast_object_list(decided)
        attempt, resume_from, self.saved_world = decided
        self.universal = recipe.train.backend == "deepspeed" and self.saved_world not in (None, world)
        if self.universal:
            load_universal_checkpoints(accelerator)
        with accelerator.main_process_first():
            ensure_corpus(recipe, accelerator.is_main_process)
            self.corpus = load_corpus(
                recipe.data.dir,
                recipe.data.cache_dir or default_cache_dir(),
                recipe.data.max_train_samples,
                recipe.data.max_eval_samples,
                recipe.data.text_normalization,
            )
        train = self.corpus.train
        self.train_rows = train.with_format("numpy", columns=["input_values", "labels"])
        self.train_ids = list(train["id"])
        self.ctc_min_frames = np.array([ctc_min_frames(labels) for labels in train["labels"]])
        self.plan: StepPlan = plan_steps(
            self.batch_plan,
            len(train),
            recipe.train.epochs,
            recipe.train.warmup_steps,
            recipe.train.max_steps,
        )
        self.order = GlobalOrder(np.asarray(train["length"]), self.batch_plan.global_batch, recipe.train.seed)
        set_seed(recipe.train.seed)
        model = build_model(recipe.model, self.corpus.vocab, self.corpus.processor.tokenizer.pad_token_id)
        optimizer = build_optimizer(model, recipe.train)
        scheduler = build_scheduler(optimizer, recipe.train, self.plan.total_steps)
        self.model, self.optimizer, self.scheduler = accelerator.prepare(model, optimizer, scheduler)
        self.log = RankLog(run_dir, self.rank, attempt=attempt)
        self.nonfinite_total = self.nonfinite_in_a_row = self.ctc_infinite_total = 0
        self.window: list[float] = []
        self.start_step = self._resume(Path(resume_from)) if resume_from else 0

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    # -- checkpoints ----------------------------------------------------------------------------------
    def _resume(self, folder: Path) -> int:
        """Load model, optimizer, scheduler, scaler and RNG; the data position is the step itself."""
        source = folder
        if self.universal:  # ZeRO shards of another world size: convert once, on rank 0
            source = folder.parent / f".universal-{folder.name}"
            if self.accelerator.is_main_process:
                checkpoint.to_universal(folder)
            self.accelerator.wait_for_everyone()
        self.accelerator.load_state(str(source))
        # accelerate restores its micro-step counter, which is only right for the accumulation it was saved
        # with; checkpoints are taken on optimizer-step boundaries, so on any world size it restarts at 0.
        self.accelerator.step = 0
        state = checkpoint.read_state(folder)
        self.nonfinite_total = state["nonfinite_total"]
        self.nonfinite_in_a_row = state["nonfinite_in_a_row"]
        self.ctc_infinite_total = state.get("ctc_infinite_total", 0)
        self.window = list(state["loss_window"])
        if self.accelerator.is_main_process:
            how = ", ZeRO state through DeepSpeed's universal format" if self.universal else ""
            print(
                f"resuming from {folder} (step {state['step']}, epoch {state['epoch']:.2f}, "
                f"saved by {self.saved_world} processes{how})",
                flush=True,
            )
        return int(state["step"])

    def save_checkpoint(self, step: int) -> Path:
        state = {
            "step": step,
            "epoch": self.plan.epoch_at(step),
            "samples_consumed": step * self.batch_plan.global_batch,
            "world_size": self.batch_plan.world_size,
            "nonfinite_total": self.nonfinite_total,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "ctc_infinite_total": self.ctc_infinite_total,
            "loss_window": self.window,
            "attempt": self.log.attempt,
        }
        return checkpoint.save(
            self.accelerator, self.checkpoints, step, state, self.recipe.checkpoint.keep_last
        )

    def _stop_agreed(self) -> bool:
        """One all-reduce per step: every rank stops at the same step if any rank was signalled."""
        if self.accelerator.num_processes == 1:
            return bool(self.stop)
        import torch

        flag = torch.tensor([1.0 if self.stop else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def _interrupt(self, step: int) -> None:
        from accelerate.utils import broadcast_object_list

        self.save_checkpoint(step)
        decided: list[Any] = [None, False]  # rank 0 classifies and requeues; every rank logs the same
        if self.accelerator.is_main_process:
            decided[0] = classify_stop(self.recipe.cluster.signal_delay_s)
            decided[1] = requeue_job(slurm_restart_count(), self.recipe.cluster.max_requeues)
        broadcast_object_list(decided)
        reason, requeued = decided
        self.log.write("meta", step, self.plan.epoch_at(step), event=reason, requeued=requeued)
        self.log.close()
        raise JobInterrupted(step, reason, requeued)

    # -- one optimizer step -------------------------------------------------------------------------
    def train_step(self, step: int) -> tuple[float, float, np.ndarray]:
        """Forward/backward over this rank's micro-batches of global step `step`, then one update."""
        from asrlaunch.data.sampler import rank_micro_batches
        from asrlaunch.runtime import collate

        accelerator = self.accelerator
        batch, pad_to = self.order.batch(step), self.order.pad_length(step)
        self.ctc_infinite_total += int((self.ctc_min_frames[batch] > self._output_frames(pad_to)).sum())
        losses, grad_norm = [], float("nan")
        for indices in rank_micro_batches(batch, self.batch_plan, self.rank):
            inputs = collate(self.train_rows, indices, pad_to)
            with accelerator.accumulate(self.model), accelerator.autocast():
                loss = self.model(
                    input_values=inputs.input_values.to(accelerator.device, self.input_dtype),
                    labels=inputs.labels.to(accelerator.device),
                ).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = self._update()
            losses.append(float(loss.detach()))
        return float(np.mean(losses)), grad_norm, batch

    def _output_frames(self, samples: int) -> int:
        """CTC frames the model emits for `samples` of audio (every micro-batch of a step is padded alike)."""
        import torch

        model = self.accelerator.unwrap_model(self.model)
        return int(model._get_feat_extract_output_lengths(torch.tensor(samples)))

    def _update(self) -> float:
        """Clip, step (unless the gradients are not finite) and schedule; all ranks agree after all-reduce."""
        limit = self.recipe.train.max_grad_norm or float("inf")
        norm = self.accelerator.clip_grad_norm_(
            self.model.parameters(), limit
        )  # DeepSpeed: it clipped itself
        norm = float("nan") if norm is None else float(norm)
        finite = bool(np.isfinite(norm))
        if finite or self.accelerator.scaler is not None:  # the fp16 scaler skips overflowing steps itself
            self.optimizer.step()
        skipped = not finite or self.accelerator.optimizer_step_was_skipped
        if not skipped:  # as the Trainer: a step that left the weights alone does not advance the schedule
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
    def run(self) -> None:
        from asrlaunch.progress import Progress

        plan, recipe, start = self.plan, self.recipe, self.start_step
        self.write_meta(start)
        progress = Progress(plan.total_steps, start, enabled=self.accelerator.is_main_process)
        if recipe.eval.at_start and start == 0:
            progress.log(self.run_eval(0))
        # samples/s: steps trained by this process since the window opened (a resumed window holds losses
        # of the attempt before), over training time only (evaluation and checkpoints excluded)
        window_start, timed_steps = time.perf_counter(), 0
        for step in range(start, plan.total_steps):
            loss, grad_norm, batch = self.train_step(step)
            self.window.append(loss)
            timed_steps += 1
            done = step + 1
            if done % recipe.logging.steps == 0 or done == plan.total_steps:
                elapsed = time.perf_counter() - window_start
                progress.log(
                    self.log.write(
                        "train",
                        done,
                        plan.epoch_at(done),
                        loss=round(float(np.mean(self.window)), 6),
                        lr=self.scheduler.get_last_lr()[0],
                        grad_norm=round(grad_norm, 6),
                        samples_per_s=round(timed_steps * plan.batch.global_batch / elapsed, 3),
                        nonfinite_skipped=self.nonfinite_total,
                        ctc_infinite=self.ctc_infinite_total,
                        **self._peak_memory(),
                        **(
                            {"sample_ids": [self.train_ids[int(i)] for i in batch]}
                            if recipe.logging.sample_ids
                            else {}
                        ),
                    )
                )
                self.window, window_start, timed_steps = [], time.perf_counter(), 0
            if done % recipe.eval.steps == 0 or done == plan.total_steps:
                eval_start = time.perf_counter()
                progress.log(self.run_eval(done))
                window_start += time.perf_counter() - eval_start
            progress.advance(done)
            if done < plan.total_steps and self._stop_agreed():
                progress.close()
                self._interrupt(done)
            save_every = recipe.checkpoint.save_steps
            if save_every and done % save_every == 0 and done < plan.total_steps:
                save_start = time.perf_counter()
                self.save_checkpoint(done)
                window_start += time.perf_counter() - save_start
        progress.close()
        self.save_final()

    def _peak_memory(self) -> dict[str, float]:
        """On a GPU: the most device memory this process has held since it started, in GiB."""
        import torch

        if self.accelerator.device.type != "cuda":
            return {}
        return {"max_memory_gib": round(torch.cuda.max_memory_allocated(self.accelerator.device) / 2**30, 3)}

    def run_eval(self, step: int) -> dict[str, Any] | None:
        from asrlaunch.evaluate import evaluate

        result = evaluate(
            self.model, self.corpus.test, self.corpus.processor, self.accelerator, self.input_dtype
        )
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
        from asrlaunch.runtime import versions

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
            slurm_restart_count=slurm_restart_count(),
            nodes=int(os.environ.get("SLURM_JOB_NUM_NODES", "1")),
            host=os.uname().nodename,
        )

    def save_final(self) -> None:
        """save_pretrained model + processor into <run_dir>/final, written aside and renamed into place."""
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            final, partial = self.run_dir / "final", self.run_dir / "final.partial"
            shutil.rmtree(partial, ignore_errors=True)
            self.accelerator.unwrap_model(self.model).save_pretrained(partial, safe_serialization=True)
            self.corpus.processor.save_pretrained(partial)
            (partial / DONE_MARKER).write_text(json.dumps({"step": self.plan.total_steps, "done": True}))
            card = final / "README.md"  # the collector's model card survives a re-save
            if card.exists():
                shutil.copy(card, partial / "README.md")
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
        self.accelerator.wait_for_everyone()
        self.log.close()


def already_finished(run_dir: Path) -> bool:
    return (run_dir / "final" / DONE_MARKER).exists()


def run_training(recipe: Recipe, run_dir: Path) -> None:
    """Train one rank of a run (the caller's process is one task of the world)."""
    adopt_launcher_environment()
    if already_finished(run_dir):
        print(f"{run_dir} finished already ({run_dir / 'final'}); nothing to train", flush=True)
        return
    restarts = slurm_restart_count()
    if restarts > recipe.cluster.max_requeues:
        raise RequeueLimitError(
            f"restarted {restarts} times, more than cluster.max_requeues="
            f"{recipe.cluster.max_requeues}; resubmit with launch/submit.py --resume {run_dir}"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    stop = StopRequest()
    stop.install()
    Trainer(recipe, run_dir, stop).run()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("--run-dir", required=True, help="run directory (logs/, checkpoints/, final/ ...)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.max_steps=10")
    return parser.parse_intermixed_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        run_training(recipe, Path(args.run_dir))
    except JobInterrupted as stopped:
        print(str(stopped), file=sys.stderr, flush=True)
        return 3
    except (DataError, BatchPlanError) as error:  # the user's input: say what to fix, no traceback
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    except (TrainingDivergedError, RequeueLimitError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
