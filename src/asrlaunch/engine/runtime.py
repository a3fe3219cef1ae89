"""Worker-side set-up: the accelerator (DDP or DeepSpeed ZeRO), precision and input dtype, versions."""

from __future__ import annotations

import ctypes
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from asrlaunch.core.plan import BatchPlan
from asrlaunch.core.recipe import Recipe
from asrlaunch.engine.output import adopt_logger


def versions() -> dict[str, str]:
    """The stack's versions, from the installed packages' metadata (importing them would cost seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0], "torch": torch.__version__}
    for name in ("transformers", "datasets", "tokenizers", "accelerate"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def deepspeed_config(recipe: Recipe, plan: BatchPlan, precision: str, on_cpu: bool) -> dict[str, Any]:
    """The batch plan passed through as DeepSpeed's micro-batch and accumulation. Buckets: DeepSpeed's 5e8
    elements on GPUs (wav2vec2-base's 95M parameters in one reduction); 5e5 on a CPU, where the default
    costs seconds per step."""
    bucket = 5e5 if on_cpu else 5e8
    return {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": recipe.train.max_grad_norm or 0.0,
        "zero_optimization": {
            "stage": recipe.train.zero_stage,
            "reduce_bucket_size": bucket,
            "allgather_bucket_size": bucket,
        },
        "fp16": {"enabled": precision == "fp16"},
        "bf16": {"enabled": precision == "bf16"},
        "zero_allow_untested_optimizer": True,  # our torch AdamW: no FusedAdam build
        "steps_per_print": 10**9,
        "checkpoint": {"load_universal": False},  # see load_universal_checkpoints
    }


def load_universal_checkpoints(accelerator: Any) -> None:
    """Resuming on another world size: DeepSpeed loads ZeRO state from the universal (unsharded) format.
    `prepare` reads the plugin's config, so this must come before it."""
    accelerator.state.deepspeed_plugin.deepspeed_config["checkpoint"]["load_universal"] = True


def single_process_environment() -> None:
    """DeepSpeed always needs a process group: give a launcher-less single process a world of one."""
    if "RANK" in os.environ:
        return
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(
        {
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )


def make_accelerator(recipe: Recipe, plan: BatchPlan, tracking_dir: Path | None = None) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import (
        DeepSpeedPlugin,
        DistributedDataParallelKwargs,
        GradientAccumulationPlugin,
        InitProcessGroupKwargs,
    )

    on_cpu = not torch.cuda.is_available()
    precision = effective_precision(recipe.train.mixed_precision, on_cpu)
    if not on_cpu and recipe.train.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    handlers: list[Any] = [DistributedDataParallelKwargs(find_unused_parameters=_needs_unused(recipe))]
    deepspeed, backend = None, None
    if recipe.train.backend == "deepspeed":
        single_process_environment()
        if on_cpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            backend = "gloo"  # else accelerate and DeepSpeed disagree on the world
        deepspeed = DeepSpeedPlugin(hf_ds_config=deepspeed_config(recipe, plan, precision, on_cpu))
    timeout = timedelta(seconds=recipe.train.collective_timeout_s)
    handlers.append(InitProcessGroupKwargs(backend=backend, timeout=timeout))
    world_size = plan.world_size
    accelerator = Accelerator(
        cpu=on_cpu and deepspeed is None,
        mixed_precision=precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=plan.grad_accum, sync_with_dataloader=False
        ),
        step_scheduler_with_optimizer=False,
        kwargs_handlers=handlers,
        deepspeed_plugin=deepspeed,
        log_with=recipe.logging.trackers or None,
        project_dir=str(tracking_dir) if tracking_dir is not None else None,
    )
    if deepspeed is not None:
        adopt_logger("DeepSpeed", recipe.logging.verbose)
    if accelerator.num_processes != world_size:
        raise RuntimeError(
            f"WORLD_SIZE says {world_size} processes but accelerate formed a world of "
            f"{accelerator.num_processes}: launch with torchrun/srun, not `accelerate launch --cpu`"
        )
    return accelerator


def adopt_thread_limit() -> None:
    """torch read OMP_NUM_THREADS when it was imported, which may be before distenv adopted the CPUs SLURM
    gave the task: apply it now, so a job computes with the same threads (and sums) as it was given. On a
    CPU, also keep freed host memory (below)."""
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))
    if not torch.cuda.is_available():
        keep_freed_host_memory()


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4


def keep_freed_host_memory() -> bool:
    """On a CPU the host heap is the device's memory, and glibc's malloc hands every tensor over 32 MiB back
    to the kernel when it is freed (mmap/munmap), so the next step faults the same pages in again: a fifth
    of a training step on the CPU comparison's model (bench/compare_hf.py). Serve large blocks from the heap
    and keep what was freed for the next step, as a GPU's caching allocator does. True when glibc took it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    settings = [(M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 256 << 20)]
    return all(mallopt(parameter, value) == 1 for parameter, value in settings)


def effective_precision(requested: str, on_cpu: bool) -> str:
    """fp16 needs a GPU (a CPU run trains in fp32); bf16 runs on CPUs too (autocast, or DeepSpeed's bf16)."""
    return "no" if on_cpu and requested == "fp16" else requested


def input_dtype(accelerator: Any) -> Any:
    """The dtype of float inputs. DeepSpeed holds the model itself in fp16/bf16 and does not autocast, so
    the audio must be cast to it, as the Trainer's `_prepare_input` does; otherwise autocast casts."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def _needs_unused(recipe: Recipe) -> bool:
    # layerdrop skips whole layers, so DDP must not wait for their gradients.
    settings = {**(recipe.model.config or {}), **recipe.model.overrides}
    return float(settings.get("layerdrop", 0.0)) > 0


def peak_memory(device: torch.device) -> dict[str, float]:
    """On a GPU: the most device memory this process has held since it started, in GiB."""
    if device.type != "cuda":
        return {}
    return {"max_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3)}
