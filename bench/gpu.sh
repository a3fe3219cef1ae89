#!/usr/bin/env bash
# The one prepared GPU check (a lent machine, well inside 10 minutes): the packages its image lacks, then
#   bench/gpu_base.py          wav2vec2-base config, fp16, global batch 32 as micro 32/16/8: samples/s, memory
#   bench/compare_hf.py --gpu  ours beside the Trainer: wall time, samples/s, eval utterances/s, MFU
#   bench/gpu_checks.py        fp16 batched eval = batch-1, DeepSpeed ZeRO-2 kill/resume, DDP kill/resume, compile
# and, as a second short call (`bash bench/gpu.sh --profile`, ~1.5 min), bench/gpu_profile.py: where a step goes.
# Each part has its own time limit, so one slow part cannot take the others' figures with it.
# Figures go to stdout and, on the device tool's machine, to $OUT/gpu.log.
#
# Before the call, here:  bash bench/gpu.sh --fetch-wheels     (wheels of what the GPU image lacks, into .whl/)
# The call:               device run, carry [".whl"], command: bash bench/gpu.sh, timeout_s 590
# Its check on a CPU:     bash bench/gpu.sh --tiny              (the smoke model, fp32, a few steps: ~5 min)
set -uo pipefail
cd "$(dirname "$0")/.."
# What the GPU image (Python 3.12, torch, transformers, accelerate, tensorboard ...) does not have.
MISSING=(datasets==5.2.0 dill multiprocess jiwer==4.0.0 rapidfuzz soundfile cffi
  pycparser submitit==1.5.4 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection
  typing-extensions hjson)
if [ "${1:-}" = "--fetch-wheels" ]; then
  grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
  for package in "${MISSING[@]}"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform any -d .whl "$package" || echo "could not fetch $package"
  done
  # DeepSpeed publishes only a source archive; its wheel is pure Python (kernels are built when first used).
  # Its setup imports torch: build it with the project's environment (make venv).
  .venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8 \
    || echo "could not build deepspeed"
  du -sh .whl; exit 0
fi
OUT=${OUT:-/tmp}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ "${1:-}" = "--tiny" ]; then
  PYTHON=${PYTHON:-.venv/bin/python}
  {
    $PYTHON bench/gpu_base.py --tiny --steps 6
    $PYTHON bench/compare_hf.py --gpu --tiny --runs 1 --work /tmp/compare-tiny
    $PYTHON bench/gpu_checks.py --tiny
    $PYTHON bench/gpu_profile.py --tiny --micro 4 --steps 2
  } 2>&1 | tee "$OUT/gpu-tiny.log"
  exit "${PIPESTATUS[0]}"
fi
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD/src
part() {  # part LIMIT SCRIPT ARGS...: one section, stopped at its limit with a line that says so
  local limit=$1; shift
  timeout "$limit" python3 "$@" || { local status=$?; echo "$1: exit $status (124: stopped at its ${limit} s limit)"; return $status; }
}
if [ "${1:-}" = "--profile" ]; then  # a second, short call: where a step's time goes
  part 150 bench/gpu_profile.py 2>&1 | tee "$OUT/gpu-profile.log"
  exit "${PIPESTATUS[0]}"
fi
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  # Limits from the first H200 run (2026-11-30): gpu_base 101 s; our side of the comparison 44 s; the
  # correctness checks ~30 s a process, so they run side by side; compile alone last.
  part 120 bench/gpu_base.py --steps 50
  part 170 bench/compare_hf.py --gpu --runs 1 --work /tmp/compare-gpu
  part 270 bench/gpu_checks.py
} 2>&1 | tee "$OUT/gpu.log"
