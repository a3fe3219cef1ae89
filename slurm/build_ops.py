"""Compile DeepSpeed's just-in-time ops that a CPU run loads, once, at install time.

On a CPU, DeepSpeed's communication backend loads its shared-memory all-reduce op (`deepspeed_shm_comm`)
at start-up and compiles it on first use: about 50 s on 2 cores, inside whichever run comes first. Building it
here puts that cost where installs belong; torch keeps the build in ~/.cache/torch_extensions and reuses it.
On a GPU machine there is nothing to do (the op is CPU-only).
"""

from __future__ import annotations

import sys


def main() -> int:
    try:
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator
    except ImportError:
        print("[build_ops] DeepSpeed is not installed: nothing to build")
        return 0
    accelerator = get_accelerator()
    builder = accelerator.create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        print(f"[build_ops] {accelerator.device_name()}: no CPU op to build")
        return 0
    try:
        builder.load()
    except Exception as failure:  # no compiler, say: only DeepSpeed on CPU needs the op, not the install
        name = builder.absolute_name()
        print(f"[build_ops] could not build {name} ({failure}); DeepSpeed on CPU will try again")
        return 0
    print(f"[build_ops] {builder.absolute_name()} ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
