#!/usr/bin/env bash
# The checks that need a CUDA GPU, in priority order, each under its own time limit; JSON + logs into DIR.
#   bash bench/gpu_checks.sh DIR [PYTHON] [STEP ...]     (STEPs: run only these, e.g. test_devices latency_pi05)
# 1. tests/test_devices.py (SFT, critic_trainer qvgm, policy forward on cuda vs CPU)
# 2. bench/policy_latency.py: real-size pi05 in bf16, 1 camera (the published anchor's setting)
# 3. bench/trainer_speed.py: Q-VGM vs Diffusion-QL vs SFT update, real-size pi05 (bf16 AMP, batch 8)
# 4. the same latency for pi05-tiny / pi05-small (fp32) and pi05 with 2 cameras; trainer speed of pi05-small, state
# Limits sum to 550 s (one device call of at most 600 s); a step past its limit leaves a partial .json/.err.
set -u
out=${1:?usage: bench/gpu_checks.sh DIR [PYTHON] [STEP ...]}
py=${2:-python3}
only=" ${*:3} "
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$py" -c "import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__)"
} 2>&1 | tee "$out/env.txt"
step() {  # step NAME SECONDS CMD...: run with a time limit, keep stdout (JSON) and stderr apart
  local name=$1 limit=$2; shift 2
  [[ "$only" == "  " || "$only" == *" $name "* ]] || return 0
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.json" 2>"$out/$name.err"
  echo "[$name] rc=$? $((SECONDS - t0)) s" | tee -a "$out/steps.txt"
}
step test_devices 90 "$py" -m pytest -q -p no:cacheprovider tests/test_devices.py
step latency_pi05 110 "$py" bench/policy_latency.py --configs pi05 --device cuda --dtype bfloat16 --cameras 1 --runs 30 \
  --cuda-graphs
step trainer_pi05 150 "$py" bench/trainer_speed.py --configs pi05 --device cuda --amp bf16 --actor-batch 8 \
  --parts actor --reps 3
step latency_small 60 "$py" bench/policy_latency.py --configs pi05-tiny,pi05-small --device cuda --runs 30 --cuda-graphs
step latency_pi05_2cam 80 "$py" bench/policy_latency.py --configs pi05 --device cuda --dtype bfloat16 --cameras 2 \
  --runs 30 --cuda-graphs
step trainer_small 60 "$py" bench/trainer_speed.py --configs pi05-small state --device cuda --critic-threads 1 --reps 5
exit 0
