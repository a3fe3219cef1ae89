"""The optimisation loop of one rank: resume, train steps (out-of-memory splits), evaluation, checkpoints,
stop signals and the final save. Every figure leaves through the metrics sink (sink.py); `train.py` is the
entry."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import broadcast_object_list, gather_object, set_seed

from asrlaunch.core.history import RunHistory
from asrlaunch.core.logs import RankLog
from asrlaunch.core.plan import StepPlan, batch_plan, plan_batch, plan_run
from asrlaunch.core.recipe import Recipe
from asrlaunch.core.records import Event
from asrlaunch.core.resume import check_resume_point
from asrlaunch.core.rundir import RunDir
from asrlaunch.data.prepare import CorpusPeers, corpus_for_rank
from asrlaunch.engine import checkpoint, runtime
from asrlaunch.engine.batches import Prefetcher, TrainData
from asrlaunch.engine.evaluate import evaluate
from asrlaunch.engine.faults import Fault, Faults, planned_faults
from asrlaunch.engine.metrics import TrainMetrics, resumed_window
from asrlaunch.engine.model import build_model, build_optimizer, build_scheduler
from asrlaunch.engine.output import save_final_model
from asrlaunch.engine.sink import Console, MetricsSink
from asrlaunch.engine.state import ResumeDecision, TrainCounters
from asrlaunch.engine.stopping import StopDecision
from asrlaunch.engine.timing import ComputeClock
from asrlaunch.engine.tracking import Tracking
from asrlaunch.job.heartbeat import Heartbeat, waiting
from asrlaunch.job.signals import JobInterrupted, StopRequest
from asrlaunch.job.task import SlurmTask


class Trainer:
    """The optimisation loop over the run's global order; one instance per rank."""

    def __init__(
        self,
        recipe: Recipe,
        run_dir: RunDir,
        stop: StopRequest | None = None,
        task: SlurmTask | None = None,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        self.recipe, self.run_dir = recipe, run_dir
        self.task = task if task is not None else SlurmTask.from_environ()
        self.heartbeat = heartbeat or Heartbeat(run_dir, int(os.environ.get("RANK", "0")), time.time())
        self.step_reached = 0
        history = RunHistory.read(run_dir)  # every rank reads it: all agree on the micro-batch cap
        world = int(os.environ.get("WORLD_SIZE", "1"))
        micro_cap = history.oom_micro_cap(recipe.train.max_micro_batch_size)
        self.batch_plan = batch_plan(recipe, world, micro_cap)
        self.accelerator = runtime.make_accelerator(recipe, self.batch_plan, run_dir.tracking)
        self.rank = self.accelerator.process_index
        self.input_dtype = runtime.input_dtype(self.accelerator)
        self.decision = self._agree_on_resume(history)
        self.heartbeat.begin_attempt(self.decision.attempt)
        self.log = RankLog(run_dir, self.rank, attempt=self.decision.attempt)
        self.faults = Faults(planned_faults(), self.rank, self._log_fault)
        self.data = self._load_data()
        self.plan: StepPlan = plan_run(recipe, world, len(self.data), micro_cap)
        self.model, self.optimizer, self.scheduler = self._build_model()
        self.counters = TrainCounters()
        memory = functools.partial(runtime.peak_memory, self.accelerator.device)
        self.window = TrainMetrics(self.batch_plan.global_batch, memory)
        self.faults.slow_model(self.net, lambda: self.step_reached)
        on_gpu = self.accelerator.device.type == "cuda"
        self.prefetcher = Prefetcher(self.data, self.batch_plan, self.rank, background=on_gpu)
        self.clock = ComputeClock(self.accelerator.device)
        request = stop if stop is not None else StopRequest()  # falsy until signalled
        self.stopping = StopDecision(request, self.accelerator, self.task, recipe.cluster)
        self.start_step = self._resume(Path(self.decision.checkpoint)) if self.decision.checkpoint else 0
        check_resume_point(self.start_step, self.plan.total_steps)
        self.faults.at_phase("start", self.start_step)
        self.sink = MetricsSink(
            self.log,
            self.window,
            Tracking(self.accelerator, recipe, run_dir, self.start_step),
            Console(self.plan.total_steps, self.start_step, enabled=self.accelerator.is_main_process),
            self.accelerator,
        )

    # -- set-up ---------------------------------------------------------------------------------------------
    def _agree_on_resume(self, history: RunHistory) -> ResumeDecision:
        """Rank 0 decides, every rank follows; before `prepare`, because ZeRO shards of another world size
        need DeepSpeed's universal loader."""
        main = self.accelerator.is_main_process
        decided: list[Any] = [
            ResumeDecision.decide(self.run_dir, history, self.task.restart_count) if main else None
        ]
        with waiting():
            broadcast_object_list(decided)
        decision: ResumeDecision = decided[0]
        self.universal = self.recipe.train.backend == "deepspeed" and decision.saved_world_size not in (
            None,
            self.batch_plan.world_size,
        )
        if self.universal:
            runtime.load_universal_checkpoints(self.accelerator)
        return decision

    def _load_data(self) -> TrainData:
        with waiting():
            node_of_rank = tuple(gather_object([self.task.node_name()]))
        deadline = self.heartbeat.started + self.recipe.train.startup_timeout_s
        self.corpus = corpus_for_rank(
            self.recipe,
            CorpusPeers(self.rank, node_of_rank, deadline),
            self.run_dir.corpus_ready(self.decision.attempt, self.decision.start),
            on_progress=self.heartbeat.progress,
            before_prepare=lambda: self.faults.at_phase("prepare", 0),
        )
        return TrainData(
            self.corpus, self.batch_plan.global_batch, self.recipe.train.seed, self.recipe.data.order
        )

    def _build_model(self) -> tuple[Any, Any, Any]:
        set_seed(self.recipe.train.seed)
        model = build_model(
            self.recipe.model, self.corpus.vocab_size, self.corpus.processor.tokenizer.pad_token_id
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
        prepared, optimizer, scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        if self.recipe.train.compile:  # the wrapper (DDP) compiled: its gradient hooks stay in the graph
            prepared = torch.compile(prepared, dynamic=True)
        return prepared, optimizer, scheduler

    def _log_fault(self, fault: Fault, step: int) -> None:
        # a fault while the corpus is prepared comes before the plan (step 0, epoch 0)
        self.log.event(Event.FAULT, step, self.plan.epoch_at(step) if step else 0.0, fault=fault.text)

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
            "loss_windows": gather_object([self.window.state_dict()]),  # every rank's own, in rank order
        }

    def load_state_dict(self, state: dict[str, Any]) -> int:
        self.counters.load_state_dict(state)
        windows = state.get("loss_windows") or [state]  # older checkpoints: rank 0's window only
        self.window.load_state_dict(resumed_window(windows, self.rank, self.accelerator.num_processes))
        return int(state["step"])

    def _resume(self, folder: Path) -> int:
        """Every state a checkpoint holds; the data position is the step itself."""
        state = checkpoint.load(self.accelerator, folder, self.universal)
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
        settings, epoch = self.recipe.checkpoint, self.plan.epoch_at(step)
        self.heartbeat.enter("checkpoint", step)
        self.faults.at_phase("checkpoint", step)
        started = time.perf_counter()
        with self.sink.paused():
            try:
                saved = checkpoint.save(
                    self.accelerator,
                    self.run_dir.checkpoints,
                    step,
                    self.state_dict(step),
                    settings.keep_last,
                )
            except checkpoint.CheckpointWriteError as problem:
                with contextlib.suppress(OSError):  # the disk that failed holds the log too
                    self.sink.event(Event.CHECKPOINT_ERROR, step, epoch, error=str(problem))
                if settings.on_error == "stop":
                    raise
                if self.accelerator.is_main_process:
                    print(f"warning: {problem}; training goes on without it", flush=True)
                return None
        self.sink.event(Event.CHECKPOINT, step, epoch, seconds=round(time.perf_counter() - started, 3))
        self.corpus.mark_used()
        self.heartbeat.enter("step", step)
        return saved

    def _stop_agreed(self) -> bool:
        with waiting():
            return self.stopping.agreed()

    def _interrupt(self, step: int) -> None:
        saved = self.save_checkpoint(step) is not None  # False: it failed under checkpoint.on_error continue
        stop = self.stopping.decide(step, f"`asrlaunch submit --resume {self.run_dir}`", saved)
        fields = {**stop.fields(), **({} if saved else {"checkpointed": False})}
        self.sink.event(stop.kind, step, self.plan.epoch_at(step), **fields)
        self.sink.close()
        raise JobInterrupted(step, stop.kind.value, stop.requeued, saved)

    # -- one optimizer step ---------------------------------------------------------------------------------
    def train_step(self, step: int) -> tuple[Any, float, np.ndarray]:
        """One optimizer step; out of memory, it is redone with half the micro-batch and twice the
        accumulation: the same samples, the same global batch, the same update up to summation order."""
        self.step_reached = step
        batch = self.data.order.batch(step)  # counted once, however often the step is redone
        frames = self._frames(self.data.order.pad_length(step))
        self.counters.ctc_infinite_total += int((self.data.ctc_min_frames[batch] > frames).sum())
        while True:
            try:
                self.faults.at_step(step, self.batch_plan.micro_batch)
                return (*self._train_step(step), batch)
            except torch.cuda.OutOfMemoryError as error:
                self._split_micro_batch(step, error)

    def _split_micro_batch(self, step: int, error: Exception) -> None:
        old = self.batch_plan
        if old.micro_batch == 1:
            raise error
        new = plan_batch(old.global_batch, old.world_size, old.micro_batch // 2)
        self.sink.event(
            Event.OOM_SPLIT, step, self.plan.epoch_at(step), plan=new.to_dict(), error=str(error)[:300]
        )
        if old.world_size > 1 or self.recipe.train.backend == "deepspeed":
            # Peers may be inside this step's gradient all-reduce: no agreement is possible mid-step. The job
            # fails, failover retries it, and the next start begins with the smaller micro-batch.
            raise error
        # The model's own: accelerate's optimizer ignores zero_grad between two syncs, which would leave the
        # gradients of the micro-batches done before the error in the redone step.
        self.net.zero_grad(set_to_none=True)
        self.accelerator.gradient_accumulation_steps = new.grad_accum
        self.accelerator.step = 0
        self.batch_plan = self.prefetcher.plan = new
        self.plan = dataclasses.replace(self.plan, batch=new)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _train_step(self, step: int) -> tuple[Any, float]:
        """Forward/backward over this rank's micro-batches of global step `step`, then one update. The loss
        stays on the device (the metrics read it once per logging window)."""
        accelerator, clock = self.accelerator, self.clock
        losses, grad_norm = [], float("nan")
        next_step = step + 1 if step + 1 < self.plan.total_steps else None
        with clock.span():  # this step's data, collated or waited for, is this rank's own time too
            self.faults.at_data(step)
            micro_batches = self.prefetcher.get(step, next_step)
        for index, inputs in enumerate(micro_batches):
            if self.faults and index == self.batch_plan.grad_accum - 1:
                self.faults.at_last_micro_batch(step, self.batch_plan.micro_batch)
            with accelerator.accumulate(self.model), accelerator.autocast():
                with clock.span():
                    loss = self.model(
                        # copied, then cast on the device (DeepSpeed's fp16 input): not cast by the host
                        input_values=inputs.input_values.to(accelerator.device, non_blocking=True).to(
                            self.input_dtype
                        ),
                        labels=inputs.labels.to(accelerator.device, non_blocking=True),
                    ).loss
                    if inputs.weight != 1.0:  # a partial global batch: the mean over its samples
                        loss = loss * inputs.weight
                if accelerator.sync_gradients:  # this backward waits for the other ranks' gradients
                    with waiting():
                        accelerator.backward(loss)
                    grad_norm = self._update()
                else:
                    with clock.span():
                        accelerator.backward(loss)
            losses.append(loss.detach())
        return torch.stack(losses).float().mean(), grad_norm

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
        self.counters.count_update(skipped, self.recipe.train.max_consecutive_nonfinite)
        return norm

    # -- the loop -------------------------------------------------------------------------------------------
    def run(self) -> None:
        plan, recipe, start = self.plan, self.recipe, self.start_step
        self.write_start(start)
        self.window.open()
        if recipe.eval.at_start and start == 0:
            self.run_eval(0)
        for step in range(start, plan.total_steps):
            started = time.perf_counter()
            loss, grad_norm, batch = self.train_step(step)
            seconds = time.perf_counter() - started
            self.sink.step_done(loss, seconds, self.clock.take())
            done = step + 1
            self.heartbeat.step_done(done, seconds)
            if done % recipe.logging.steps == 0 or done == plan.total_steps:
                self.write_train_record(done, grad_norm, batch)
            if done % recipe.eval.steps == 0 or done == plan.total_steps:
                self.run_eval(done)
            self.sink.advance(done)
            if done < plan.total_steps and self._stop_agreed():
                self.sink.console.close()
                self._interrupt(done)
            save_every = recipe.checkpoint.save_steps
            if save_every and done % save_every == 0 and done < plan.total_steps:
                self.save_checkpoint(done)
        self.sink.console.close()
        self.prefetcher.close()
        self.save_final()

    def write_train_record(self, step: int, grad_norm: float, batch: np.ndarray) -> dict[str, Any]:
        sample_ids = (
            {"sample_ids": [self.data.ids[int(i)] for i in batch]} if self.recipe.logging.sample_ids else {}
        )
        return self.sink.train(
            step,
            self.plan.epoch_at(step),
            lr=self.scheduler.get_last_lr()[0],
            grad_norm=round(grad_norm, 6),
            nonfinite_skipped=self.counters.nonfinite_total,
            ctc_infinite=self.counters.ctc_infinite_total,
            **sample_ids,
        )

    def run_eval(self, step: int) -> dict[str, Any] | None:
        self.heartbeat.enter("eval", step)
        self.faults.at_phase("eval", step)
        started = time.perf_counter()
        settings = self.recipe.eval
        with self.sink.paused():
            result = evaluate(
                self.net,
                self.corpus.test,
                self.corpus.processor,
                self.accelerator,
                self.input_dtype,
                mode=settings.mode,
                max_batch_seconds=settings.max_batch_seconds,
                on_batch=self.heartbeat.progress,
            )
        self.heartbeat.enter("step" if step else "startup", step)
        if result is None:
            return None
        return self.sink.eval(
            step,
            self.plan.epoch_at(step),
            eval_loss=round(result.eval_loss, 6),
            wer=round(result.wer, 6),
            eval_samples=result.samples,
            eval_seconds=round(time.perf_counter() - started, 3),
        )

    def write_start(self, start_step: int) -> None:
        """This rank's start record: the attempt's plan, where it resumed, where it runs."""
        self.log.start(
            start_step,
            self.plan.epoch_at(start_step),
            world_size=self.batch_plan.world_size,
            plan=self.plan.to_dict(),
            versions=runtime.versions(),
            recipe=self.recipe.to_dict(),
            device=str(self.accelerator.device),
            resumed_from=start_step or None,
            **self.task.placement(),
            process_started=round(self.heartbeat.started, 3),
            cache="hit" if self.corpus.cache_hit else "built",
            skipped_utterances=self.corpus.skipped,
        )

    def save_final(self) -> None:
        self.heartbeat.enter("final", self.plan.total_steps)
        with waiting():
            self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            save_final_model(self.net, self.corpus.processor, self.run_dir, self.plan.total_steps)
        with waiting():
            self.accelerator.wait_for_everyone()
        self.sink.close()
