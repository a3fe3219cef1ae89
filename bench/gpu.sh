#!/usr/bin/env bash
# The one prepared GPU check (a lent machine, well inside 10 minutes): the packages its image lacks, then
#   bench/gpu_base.py          wav2vec2-base config, fp16, global batch 32 as micro 32/16/8: samples/s, memory
#   bench/compare_hf.py --gpu  ours beside the Trainer: wall time, samples/s, eval utterances/s, MFU
#   bench/gpu_checks.py        fp16 batched eval = batch-1, DeepSpeed ZeRO-2 and one-process kill/resume, compile
# and, as a second short call (`bash bench/gpu.sh --profile`, < 2 min), bench/gpu_profile.py: where a step goes.
# Each part has its own time limit, so one slow part cannot take the others' figures with it.
# Figures go to stdout and, on the device tool's machine, to $OUT/gpu.log.
#
# Before the call, here:  bash bench/gpu.sh --fetch-wheels     (wheels of what the GPU image lacks, into .whl/)
# The call:               device run, carry [".whl"], command: bash bench/gpu.sh, timeout_s 560 (limits: 470 s)
# Its check on a CPU:     bash bench/gpu.sh --tiny              (the smoke model, fp32, a few steps: ~5 min)
set -uo pipefail
cd "$(dirname "$0")/.."
# What the GPU image (Python 3.12, torch, transformers, accelerate, tensorboard ...) does not have, every one
# pinned: two versions of one package in .whl/ would stop the whole install (datasets 5.2 needs dill<0.4.2).
MISSING=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 jiwer==4.0.0 rapidfuzz==3.14.6 soundfile==0.14.0
  cffi==2.1.1 pycparser==3.12 submitit==1.5.4 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
  typing-inspection==0.4.5 typing-extensions==4.16.0 hjson==3.1.0)
if [ "${1:-}" = "--fetch-wheels" ]; then
  grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
  rm -rf .whl
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
    rm -rf /tmp/gpu-checks-tiny
    $PYTHON bench/gpu_checks.py --tiny --part checks --work /tmp/gpu-checks-tiny
    $PYTHON bench/gpu_checks.py --tiny --part compile --work /tmp/gpu-checks-tiny
    $PYTHON bench/gpu_profile.py --tiny --micro 4 --steps 2
  } 2>&1 | tee "$OUT/gpu-tiny.log"
  exit "${PIPESTATUS[0]}"
fi
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || { echo "the wheels in .whl/ did not install: nothing measured"; exit 1; }
fi
export PYTHONPATH=/tmp/site:$PWD/src
part() {  # part LIMIT SCRIPT ARGS...: one section, stopped at its limit (KILL 10 s after TERM) with a line
  local limit=$1; shift
  timeout -k 10 "$limit" python3 "$@" || { local status=$?; echo "$1: exit $status (124: stopped at its ${limit} s limit)"; return $status; }
}
if [ "${1:-}" = "--profile" ]; then  # a second, short call: where a step's time goes
  part 110 bench/gpu_profile.py 2>&1 | tee "$OUT/gpu-profile.log"
  exit "${PIPESTATUS[0]}"
fi
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  # Limits from the first H200 run (2026-11-30): a process ~30 s (10 s of it start-up), gpu_base 101 s at 50
  # steps. The figures still open come first: the comparison (its Trainer side did not finish in 120 s at
  # 60 steps), the checks side by side, compile alone; then the micro-batch table again.
  part 140 bench/compare_hf.py --gpu --runs 1 --steps 40 --eval-every 20 --eval-samples 100 --work /tmp/compare-gpu
  rm -rf /tmp/gpu-checks  # a rerun on a warm machine would find the last call's finished runs
  part 130 bench/gpu_checks.py --part checks --work /tmp/gpu-checks
  part 120 bench/gpu_checks.py --part compile --work /tmp/gpu-checks
  part 80 bench/gpu_base.py --steps 30
} 2>&1 | tee "$OUT/gpu.log"
