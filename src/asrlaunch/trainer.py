"""The optimisation loop of one rank: resume, train steps (out-of-memory splits), logging, evaluation,
checkpoints, stop signals and the final save. `train.py` is its entry point."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import broadcast_object_list, set_seed

from asrlaunch import checkpoint
from asrlaunch.data.batches import Prefetcher, TrainData, ensure_corpus, prepare_corpus
from asrlaunch.evaluate import evaluate
from asrlaunch.faults import crash_now, planned_fault
from asrlaunch.logs import RankLog, slurm_restart_count
from asrlaunch.metrics import TrainMetrics
from asrlaunch.model import build_model, build_optimizer, build_scheduler
from asrlaunch.plan import StepPlan, plan_batch, plan_steps
from asrlaunch.progress import Progress
from asrlaunch.recipe import Recipe
from asrlaunch.rundir import RunDir
from asrlaunch.runtime import (
    input_dtype,
    load_universal_checkpoints,
    make_accelerator,
    versions,
)
from asrlaunch.signals import JobInterrupted, StopRequest, requeue_job, stop_reason
from asrlaunch.state import ResumeDecision, TrainCounters, oom_micro_cap
from asrlaunch.tracking import Tracking


class TrainingDivergedError(RuntimeError):
    """Too many optimizer steps in a row had non-finite gradients."""


class RequeueLimitError(RuntimeError):
    """The job was restarted more often than cluster.max_requeues allows."""


class Trainer:
    """The optimisation loop over the run's global order; one instance per rank."""

    def __init__(self, recipe: Recipe, run_dir: RunDir, stop: StopRequest | None = None) -> None:
        self.recipe, self.run_dir = recipe, run_dir
        self.stop = stop if stop is not None else StopRequest()  # falsy until signalled
        world = int(os.environ.get("WORLD_SIZE", "1"))
        micro_limit = min(
            recipe.train.max_micro_batch_size, oom_micro_cap(run_dir) or recipe.train.global_batch_size
        )
        self.batch_plan = plan_batch(recipe.train.global_batch_size, world, micro_limit)
        self.fault = planned_fault()
        self.step_reached = 0
        self.accelerator = make_accelerator(recipe, self.batch_plan, run_dir.tracking)
        self.rank = self.accelerator.process_index
        self.input_dtype = input_dtype(self.accelerator)
        self.decision = self._agree_on_resume()
        self.data = self._load_data()
        self.plan: StepPlan = plan_steps(
            self.batch_plan,
            len(self.data),
            recipe.train.epochs,
            recipe.train.warmup_steps,
            recipe.train.max_steps,
        )
        self.model, self.optimizer, self.scheduler = self._build_model()
        self.counters = TrainCounters()
        self.metrics = TrainMetrics(self.batch_plan.global_batch, self._peak_memory)
        self.log = RankLog(run_dir, self.rank, attempt=self.decision.attempt)
        on_gpu = self.accelerator.device.type == "cuda"
        self.prefetcher = Prefetcher(self.data, self.batch_plan, self.rank, background=on_gpu)
        self.start_step = self._resume(Path(self.decision.checkpoint)) if self.decision.checkpoint else 0
        self.tracking = Tracking(self.accelerator, recipe, run_dir, self.start_step)

    # -- set-up ---------------------------------------------------------------------------------------------
    def _agree_on_resume(self) -> ResumeDecision:
        """Rank 0 decides, every rank follows; before `prepare`, because ZeRO shards of another world size
        need DeepSpeed's universal loader."""
        decided: list[Any] = [
            ResumeDecision.decide(self.run_dir) if self.accelerator.is_main_process else None
        ]
        broadcast_object_list(decided)
        decision: ResumeDecision = decided[0]
        self.universal = self.recipe.train.backend == "deepspeed" and decision.saved_world_size not in (
            None,
            self.batch_plan.world_size,
        )
        if self.universal:
            load_universal_checkpoints(self.accelerator)
        return decision

    def _load_data(self) -> TrainData:
        with self.accelerator.main_process_first():
            ensure_corpus(self.recipe, self.accelerator.is_main_process)
            self.corpus = prepare_corpus(self.recipe)
        return TrainData(self.corpus, self.batch_plan.global_batch, self.recipe.train.seed)

    def _build_model(self) -> tuple[Any, Any, Any]:
        set_seed(self.recipe.train.seed)
        model = build_model(
            self.recipe.model, self.corpus.vocab, self.corpus.processor.tokenizer.pad_token_id
        )
        # CTC frames per padded length, cached: the check for too-short transcripts costs nothing per step.
        output_lengths = model._get_feat_extract_output_lengths
        self._frames = functools.cache(lambda samples: int(output_lengths(samples)))
        fused = self.accelerator.device.type == "cuda" and self.recipe.train.backend == "ddp"
        optimizer = build_optimizer(model, self.recipe.train, fused=fused)
        scheduler = build_scheduler(optimizer, self.recipe.train, self.plan.total_steps)
        # The bare model, which `prepare` wraps (DDP, DeepSpeed) but keeps: what accelerate's unwrap_model
        # returns, without its import of DeepSpeed (seconds) at every first evaluation.
        self.net = model
        return self.accelerator.prepare(model, optimizer, scheduler)

    # -- checkpoints ----------------------------------------------------------------------------------------
    def state_dict(self, step: int) -> dict[str, Any]:
        """The trainer's own state beside the tensors accelerate saves: position, counters, logging window."""
        return {
            "step": step,
            "epoch": self.plan.epoch_at(step),
            "samples_consumed": step * self.batch_plan.global_batch,
            "world_size": self.batch_plan.world_size,
            "attempt": self.log.attempt,
            **self.counters.state_dict(),
            **self.metrics.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> int:
        self.counters.load_state_dict(state)
        self.metrics.load_state_dict(state)
        return int(state["step"])

    def _resume(self, folder: Path) -> int:
        """Load model, optimizer, scheduler, scaler and RNG; the data position is the step itself."""
        source = folder
        if self.universal:  # ZeRO shards of another world size: convert once, on rank 0
            source = checkpoint.universal_dir(folder)
            if self.accelerator.is_main_process:
                checkpoint.to_universal(folder)
            self.accelerator.wait_for_everyone()
        self.accelerator.load_state(str(source))
        # accelerate restores its micro-step counter, which is only right for the accumulation it was saved
        # with; checkpoints are taken on optimizer-step boundaries, so on any world size it restarts at 0.
        self.accelerator.step = 0
        state = checkpoint.read_state(folder)
        step = self.load_state_dict(state)
        if self.accelerator.is_main_process:
            how = ", ZeRO state through DeepSpeed's universal format" if self.universal else ""
            print(
                f"resuming from {folder} (step {step}, epoch {state['epoch']:.2f}, "
                f"saved by {self.decision.saved_world_size} processes{how})",
                flush=True,
            )
        return step

    def save_checkpoint(self, step: int) -> Path | None:
        """A checkpoint of `step`; None when it could not be written and `checkpoint.on_error` is continue."""
        settings = self.recipe.checkpoint
        with self.metrics.paused():
            try:
                return checkpoint.save(
                    self.accelerator,
                    self.run_dir.checkpoints,
                    step,
                    self.state_dict(step),
                    settings.keep_last,
                )
            except checkpoint.CheckpointWriteError as problem:
                with contextlib.suppress(OSError):  # the disk that failed holds the log too
                    self.log.write(
                        "meta", step, self.plan.epoch_at(step), event="checkpoint_error", error=str(problem)
                    )
                if settings.on_error == "stop":
                    raise
                if self.accelerator.is_main_process:
                    print(f"warning: {problem}; training goes on without it", flush=True)
                return None

    def _stop_agreed(self) -> bool:
        """One all-reduce per step: every rank stops at the same step if any rank was signalled."""
        if self.accelerator.num_processes == 1:
            return bool(self.stop)
        flag = torch.tensor([1.0 if self.stop else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def _interrupt(self, step: int) -> None:
        self.save_checkpoint(step)
        decided: list[Any] = [None, False, {}]  # rank 0 classifies and requeues; every rank logs the same
        if self.accelerator.is_main_process:
            decided[0] = stop_reason(self.stop.signal, self.recipe.cluster.signal_delay_s)
            budget, restarts = self.recipe.cluster.max_requeues, slurm_restart_count()
            decided[1] = decided[0] != "terminated" and requeue_job(restarts, budget)
            if decided[0] != "terminated" and restarts >= budget and os.environ.get("SLURM_JOB_ID"):
                decided[2] = {
                    "error": f"requeue limit reached (cluster.max_requeues={budget}): the checkpoint of step "
                    f"{step} is kept; continue with launch/submit.py --resume {self.run_dir}"
                }
        broadcast_object_list(decided)
        reason, requeued, extra = decided
        self.log.write("meta", step, self.plan.epoch_at(step), event=reason, requeued=requeued, **extra)
        self.log.close()
        self.tracking.close()
        raise JobInterrupted(step, reason, requeued)

    # -- one optimizer step ---------------------------------------------------------------------------------
    def train_step(self, step: int) -> tuple[Any, float, np.ndarray]:
        """One optimizer step; out of memory, it is redone with half the micro-batch and twice the
        accumulation: the same samples, the same global batch, the same update up to summation order."""
        while True:
            try:
                return self._train_step(step)
            except torch.cuda.OutOfMemoryError as error:
                self._split_micro_batch(step, error)

    def _split_micro_batch(self, step: int, error: Exception) -> None:
        old = self.batch_plan
        if old.micro_batch == 1:
            raise error
        new = plan_batch(old.global_batch, old.world_size, old.micro_batch // 2)
        self.log.write(
            "meta",
            step,
            self.plan.epoch_at(step),
            event="oom_split",
            plan=new.to_dict(),
            error=str(error)[:300],
        )
        if old.world_size > 1 or self.recipe.train.backend == "deepspeed":
            # Peers may be inside this step's gradient all-reduce: no agreement is possible mid-step. The job
            # fails, failover requeues it, and the next start begins with the smaller micro-batch.
            raise error
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.gradient_accumulation_steps = new.grad_accum
        self.accelerator.step = 0
        self.batch_plan = self.prefetcher.plan = new
        self.plan = dataclasses.replace(self.plan, batch=new)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.run_dir.write_plan(self.plan.to_dict())

    def _train_step(self, step: int) -> tuple[Any, float, np.ndarray]:
        """Forward/backward over this rank's micro-batches of global step `step`, then one update. The loss
        stays on the device (the metrics read it once per logging window)."""
        accelerator = self.accelerator
        self.step_reached = step
        if self.fault is not None and self.fault.due(step, self.rank, self.batch_plan.micro_batch):
            if self.fault.kind == "crash":
                crash_now()
            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory (injected by ASRLAUNCH_FAULT at step {step})"
            )
        batch = self.data.order.batch(step)
        frames = self._frames(self.data.order.pad_length(step))
        self.counters.ctc_infinite_total += int((self.data.ctc_min_frames[batch] > frames).sum())
        losses, grad_norm = [], float("nan")
        next_step = step + 1 if step + 1 < self.plan.total_steps else None
        for inputs in self.prefetcher.get(step, next_step):
            with accelerator.accumulate(self.model), accelerator.autocast():
                loss = self.model(
                    input_values=inputs.input_values.to(
                        accelerator.device, self.input_dtype, non_blocking=True
                    ),
                    labels=inputs.labels.to(accelerator.device, non_blocking=True),
                ).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = self._update()
            losses.append(loss.detach())
        return torch.stack(losses).float().mean(), grad_norm, batch

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
        counters = self.counters
        counters.nonfinite_total += int(skipped)
        counters.nonfinite_in_a_row = counters.nonfinite_in_a_row + 1 if skipped else 0
        if counters.nonfinite_in_a_row >= self.recipe.train.max_consecutive_nonfinite:
            raise TrainingDivergedError(
                f"{counters.nonfinite_in_a_row} optimizer steps in a row had non-finite gradients; lower "
                "train.lr, raise train.warmup_steps or check the data"
            )
        return norm

    # -- the loop -------------------------------------------------------------------------------------------
    def run(self) -> None:
        plan, recipe, start = self.plan, self.recipe, self.start_step
        self.write_meta(start)
        progress = Progress(plan.total_steps, start, enabled=self.accelerator.is_main_process)
        if recipe.eval.at_start and start == 0:
            progress.log(self.run_eval(0))
        for step in range(start, plan.total_steps):
            loss, grad_norm, batch = self.train_step(step)
            self.metrics.step_done(loss)
            done = step + 1
            if done % recipe.logging.steps == 0 or done == plan.total_steps:
                progress.log(self.write_train_record(done, grad_norm, batch))
            if done % recipe.eval.steps == 0 or done == plan.total_steps:
                with self.metrics.paused():
                    progress.log(self.run_eval(done))
            progress.advance(done)
            if done < plan.total_steps and self._stop_agreed():
                progress.close()
                self._interrupt(done)
            save_every = recipe.checkpoint.save_steps
            if save_every and done % save_every == 0 and done < plan.total_steps:
                self.save_checkpoint(done)
        progress.close()
        self.prefetcher.close()
        self.save_final()

    def write_train_record(self, step: int, grad_norm: float, batch: np.ndarray) -> dict[str, Any]:
        sample_ids = (
            {"sample_ids": [self.data.ids[int(i)] for i in batch]} if self.recipe.logging.sample_ids else {}
        )
        record = self.log.write(
            "train",
            step,
            self.plan.epoch_at(step),
            **self.metrics.flush(),
            lr=self.scheduler.get_last_lr()[0],
            grad_norm=round(grad_norm, 6),
            nonfinite_skipped=self.counters.nonfinite_total,
            ctc_infinite=self.counters.ctc_infinite_total,
            **sample_ids,
        )
        self.tracking.log_train(record)
        return record

    def _peak_memory(self) -> dict[str, float]:
        """On a GPU: the most device memory this process has held since it started, in GiB."""
        if self.accelerator.device.type != "cuda":
            return {}
        return {"max_memory_gib": round(torch.cuda.max_memory_allocated(self.accelerator.device) / 2**30, 3)}

    def run_eval(self, step: int) -> dict[str, Any] | None:
        started = time.perf_counter()
        settings = self.recipe.eval
        result = evaluate(
            self.net,
            self.corpus.test,
            self.corpus.processor,
            self.accelerator,
            self.input_dtype,
            mode=settings.mode,
            max_batch_seconds=settings.max_batch_seconds,
        )
        if result is None:
            return None
        self.tracking.log({"eval/loss": result.eval_loss, "eval/wer": result.wer}, step)
        return self.log.write(
            "eval",
            step,
            self.plan.epoch_at(step),
            eval_loss=round(result.eval_loss, 6),
            wer=round(result.wer, 6),
            eval_samples=result.samples,
            eval_seconds=round(time.perf_counter() - started, 3),
        )

    def write_meta(self, start_step: int) -> None:
        if self.accelerator.is_main_process:
            self.run_dir.write_plan(self.plan.to_dict())
            self.run_dir.write_recipe(self.recipe.to_yaml())
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
            node=os.environ.get("SLURMD_NODENAME"),  # SLURM's name of this task's node
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        )

    def save_final(self) -> None:
        """save_pretrained model + processor into final/, written aside and renamed into place."""
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            final, partial = self.run_dir.final, self.run_dir.final_partial
            shutil.rmtree(partial, ignore_errors=True)
            self.net.save_pretrained(partial, safe_serialization=True)
            self.corpus.processor.save_pretrained(partial)
            if self.run_dir.card.exists():  # the collector's model card survives a re-save
                shutil.copy(self.run_dir.card, partial / self.run_dir.card.name)
            self.run_dir.mark_finished(partial, self.plan.total_steps)
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
        self.accelerator.wait_for_everyone()
        self.log.close()
        self.tracking.close()
