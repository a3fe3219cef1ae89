"""Submit a recipe as SLURM jobs (through submitit), or look at the exact plan first.

    asrlaunch submit recipes/timit32.yaml data.dir=/data/TIMIT
    asrlaunch submit recipes/timit32.yaml cluster.nodes=2 cluster.gpus_per_node=4 --dry-run
    asrlaunch submit recipes/smoke.yaml --sweep train.lr=1e-3,3e-3 --sweep train.seed=1,2
    asrlaunch submit --resume runs/smoke [cluster.time_min=480 ...]

(`python launch/submit.py ...` is the same command.) Never imports torch: a dry run answers in about a second.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

from asrlaunch.core.console import clean_warnings, error
from asrlaunch.core.exits import ExitCode
from asrlaunch.core.history import RunHistory
from asrlaunch.core.plan import BatchPlanError, plan_run, scheduled_lr
from asrlaunch.core.recipe import Recipe, RecipeError, load_run_recipe, read_recipe_file
from asrlaunch.core.resume import check_resume, check_resume_point
from asrlaunch.core.rundir import RunDir
from asrlaunch.job.scheduler import PREEMPTED
from asrlaunch.launcher.preflight import preflight
from asrlaunch.launcher.preparation import preparation_sbatch
from asrlaunch.launcher.status import RunStatus, WaitProgress, collect_status, state_text, wait_for
from asrlaunch.launcher.submission import (
    SubmitError,
    check_submittable,
    choose_executor,
    plan_for,
    sbatch_text,
    slurm_available,
    submit,
)
from asrlaunch.launcher.sweep import RunSpec, resolve_runs, submitit_folder
from asrlaunch.results.merge import run_result
from asrlaunch.results.report import write_run_report
from asrlaunch.results.table import render_table

DEFAULT_RECIPE = Path(__file__).resolve().parents[3] / "recipes" / "smoke.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="asrlaunch submit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("recipe", nargs="?", help=f"recipe YAML (default: {DEFAULT_RECIPE.name})")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.max_steps=100")
    parser.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="submit the cross product of these values as one job array (repeatable)",
    )
    parser.add_argument(
        "--executor",
        default="auto",
        choices=["auto", "slurm", "local"],
        help="slurm when a controller answers, else local processes (default: auto)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the plan and sbatch script; submit nothing"
    )
    parser.add_argument("--json", action="store_true", help="with --dry-run: one JSON object")
    parser.add_argument(
        "--resume", metavar="RUN_DIR", help="re-submit a stopped or failed run from its directory"
    )
    parser.add_argument(
        "--wait", action="store_true", help="show progress until the jobs end, then the results table"
    )
    parser.add_argument(
        "--no-preflight",
        action="store_true",
        help="skip the checks of data, model, trackers and job shape (e.g. data seen only by compute nodes)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="with --resume: go ahead although the run's last job state cannot be read (check squeue first)",
    )
    args = parser.parse_intermixed_args(argv)
    if args.recipe and "=" in args.recipe and not args.recipe.endswith((".yaml", ".yml")):
        args.overrides.insert(0, args.recipe)
        args.recipe = None
    conflicts = [
        message
        for broken, message in (
            (args.json and not args.dry_run, "--json goes with --dry-run (without it, jobs are submitted)"),
            (args.force and not args.resume, "--force goes with --resume"),
            (args.wait and args.dry_run, "--wait follows submitted jobs; --dry-run submits none"),
            (args.resume and args.recipe, "--resume takes the run's own recipe: leave out RECIPE"),
        )
        if broken
    ]
    if conflicts:
        parser.error("; ".join(conflicts))
    return args


def new_length(
    run_dir: RunDir, history: RunHistory, stored: Recipe, resumed: Recipe
) -> tuple[int, int] | None:
    """The run's length in steps before and after a resume that changes `train.max_steps` (None: unchanged,
    or a run that never planned)."""
    if stored.train.max_steps == resumed.train.max_steps:
        return None
    plan = history.latest_plan or run_dir.read_plan()
    old_total, samples = plan.get("total_steps"), plan.get("train_samples")
    if not old_total or not samples:
        return None
    return int(old_total), plan_run(resumed, 1, int(samples)).total_steps


def check_new_length(run_dir: RunDir, history: RunHistory, stored: Recipe, resumed: Recipe) -> None:
    """A shorter run must still reach its newest checkpoint, refused here rather than after the queue wait
    (the trainer checks the checkpoint it actually loads, too)."""
    from asrlaunch.engine.checkpoint import list_checkpoints  # no torch: folder names only

    lengths, newest = new_length(run_dir, history, stored, resumed), list_checkpoints(run_dir.checkpoints)
    if lengths is not None and newest:
        check_resume_point(newest[0][0], lengths[1])


def schedule_change(run_dir: RunDir, history: RunHistory, stored: Recipe, resumed: Recipe) -> str:
    """What a new `train.max_steps` does to the learning rate where the run resumes: the schedule is computed
    anew for the new length (as the Trainer's), so a linear one jumps."""
    lengths = new_length(run_dir, history, stored, resumed)
    if lengths is None:
        return ""
    old_total, new_total = lengths
    step = history.progress.step or 0
    before, after = scheduled_lr(stored, step, int(old_total)), scheduled_lr(resumed, step, new_total)
    if math.isclose(before, after):
        return ""
    return (
        f"train.max_steps: {old_total} -> {new_total} steps: the schedule is computed for the new length, so "
        f"the learning rate at step {step} goes from {before:.3g} to {after:.3g}"
    )


def load_specs(args: argparse.Namespace) -> list[RunSpec]:
    if args.resume:
        run_dir = RunDir(Path(args.resume))
        if not run_dir.is_run():
            raise SubmitError(f"{run_dir} is not a run directory (no {run_dir.recipe.name})")
        if args.sweep:
            raise SubmitError("--resume continues one run; it takes no --sweep")
        # the run's own recipe, its paths as they were resolved at its submission
        raw = read_recipe_file(run_dir.recipe)
        specs = resolve_runs(raw, str(run_dir.recipe), args.overrides, [], new_run=False)
        stored = load_run_recipe(run_dir.recipe)
        check_resume(stored, specs[0].recipe)
        history = RunHistory.read(run_dir)
        check_new_length(run_dir, history, stored, specs[0].recipe)
        ensure_stopped(run_dir, args.force)
        note = schedule_change(run_dir, history, stored, specs[0].recipe)
        if note:
            warnings.warn(note, stacklevel=1)
        return [RunSpec(specs[0].recipe, specs[0].overrides, run_dir)]
    path = Path(args.recipe) if args.recipe else DEFAULT_RECIPE
    return resolve_runs(read_recipe_file(path), str(path), args.overrides, args.sweep)


def ensure_stopped(run_dir: RunDir, force: bool = False) -> None:
    """Two jobs must never write one run: --resume waits until the run's last job has ended. A state that
    cannot be read (UNKNOWN: squeue or sacct failing for a moment) may be a running job, and a PREEMPTED one
    still listed may be on its way back to the queue: refused too, unless --force."""
    (status,) = collect_status([run_dir.path])
    if not status.job_id or status.job.ended:
        return
    if status.job.may_have_ended:
        if force:
            return
        why = (
            "was preempted, and may be on its way back to the queue"
            if status.job.state == PREEMPTED
            else "cannot be read (the scheduler did not answer, or forgot it)"
        )
        raise SubmitError(
            f"{run_dir}: its job {status.job_id} {why}; check `squeue -j {status.job_id}`, then "
            "--resume --force if it is not pending or running"
        )
    raise SubmitError(
        f"{run_dir}: its job {status.job_id} is {status.job.state}; cancel it "
        f"(scancel {status.job_id}) or let it finish before --resume"
    )


def run_preflight(specs: list[RunSpec], kind: str, verbose: bool) -> list[str]:
    """What each failed check says (each names the recipe key to change); `verbose`: every line printed."""
    seen, failed = set(), []
    for spec in specs:
        for check in preflight(spec.recipe, kind):
            if check.line() in seen:
                continue
            seen.add(check.line())
            if verbose:
                print(f"# preflight {check.line()}")
            if not check.ok:
                failed.append(check.message)
    return failed


def refuse_failed(failed: list[str], what: str) -> None:
    """SubmitError with one line per failed preflight check, then `what` follows from it."""
    if failed:
        raise SubmitError("\n".join(failed) + f"\n({what}; --no-preflight skips these checks)")


PREPARATION_ID = "PREPARATION_JOB_ID"  # the id SLURM gives the preparation job


def dry_run(specs: list[RunSpec], as_json: bool) -> None:
    preparation = preparation_sbatch(specs)
    after = PREPARATION_ID if preparation else None
    script = sbatch_text(
        specs[0].recipe, submitit_folder(specs), [spec.run_dir.path for spec in specs], after
    )
    runs = [
        {"run_dir": str(s.run_dir), "overrides": list(s.overrides), **plan_for(s.recipe).to_dict()}
        for s in specs
    ]
    if as_json:
        print(
            json.dumps(
                {
                    **runs[0],
                    "runs": runs,
                    "sbatch": script,
                    "prepare_sbatch": preparation,
                    "recipe": specs[0].recipe.to_dict(),
                },
                indent=1,
            )
        )
        return
    print(f"# resolved recipe\n{specs[0].recipe.to_yaml()}")
    for run in runs:
        print(f"# run {run['run_dir']}  {' '.join(run['overrides'])}")
        print(
            f"  global batch {run['global_batch']} = micro-batch {run['micro_batch']} x grad accumulation "
            f"{run['grad_accum']} x world size {run['world_size']}"
        )
        print(
            f"  {run['steps_per_epoch']} steps/epoch, {run['total_steps']} steps ({run['epochs']} epochs), "
            f"warmup {run['warmup_steps']} steps ({run['warmup_share']:.1%})"
        )
    if preparation:
        partition = specs[0].recipe.cluster.prepare_partition
        print(f"\n# preparation job (asrlaunch prepare on {partition}; the corpus is not in the cache yet)")
        print(preparation)
    what = f"job array of {len(specs)}" if len(specs) > 1 else "one job"
    waits = ", after the preparation job" if preparation else ""
    print(f"\n# sbatch script ({what}{waits})\n{script}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    clean_warnings()
    try:
        specs = load_specs(args)
        check_submittable(specs, resume=bool(args.resume))  # what a submission refuses, a dry run too
        if args.dry_run:
            failed = []
            if not args.no_preflight and not args.json:
                failed = run_preflight(specs, "slurm" if slurm_available() else "local", verbose=True)
            dry_run(specs, args.json)  # the whole plan still, then what a submission would refuse
            refuse_failed(failed, "a submission would be refused")
            return ExitCode.OK
        kind = choose_executor(args.executor)
        if not args.no_preflight:
            refuse_failed(run_preflight(specs, kind, verbose=False), "nothing was submitted")
        submitted = submit(specs, kind, resume=bool(args.resume))
    except (RecipeError, BatchPlanError, SubmitError) as problem:
        error(problem)
        return ExitCode.USAGE
    for spec, job_id in submitted:
        print(f"submitted {kind} job {job_id}: {spec.run_dir}")
    first = submitted[0][1].split("_")[0]
    dirs = " ".join(
        sorted({str(s.run_dir.path if len(specs) == 1 else s.run_dir.path.parent) for s, _ in submitted})
    )
    if kind == "slurm":
        print(f"watch it:  squeue -j {first}   |   asrlaunch status {dirs} --watch")
    else:
        print(f"watch it:  asrlaunch status {dirs} --watch")
    if args.wait:
        progress = WaitProgress(terminal=sys.stdout.isatty())
        try:
            statuses = wait_for([spec.run_dir for spec, _ in submitted], on_poll=progress)
        finally:
            progress.close()
        return report_end(statuses)
    return ExitCode.OK


def report_end(statuses: list[RunStatus]) -> int:
    """Each run's results table (the collector's files written), final state and where everything is; 0 only
    when every run completed."""
    for status in statuses:
        run_dir = status.run_dir
        try:
            result = run_result(run_dir)
        except (FileNotFoundError, ValueError) as problem:
            print(f"(no results for {run_dir}: {problem})")
        else:
            write_run_report(result)
            print(f"\n# {run_dir}\n{render_table([row.values() for row in result.rows])}")
            print(f"model card: {run_dir.card}   plot: {run_dir.curves}   table: {run_dir.results_md}")
        wer = f", final WER {status.wer:.4f}" if status.wer is not None else ""
        print(f"{state_text(status)}: {run_dir}{wer}")
        print(f"  model: {run_dir.final}   logs: {run_dir.logs}   job output: {run_dir.submitit}")
        for note in status.notes:
            print(f"  {note}")
    return ExitCode.OK if all(s.job.state == "COMPLETED" for s in statuses) else ExitCode.FAILED


if __name__ == "__main__":
    sys.exit(main())
