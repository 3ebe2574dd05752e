#!/usr/bin/env bash
# One-command GPU validation of the scale path (issue 12): FSDP2 / DeepSpeed ZeRO-2/3 train steps at reduced
# depth, the 11B expert's fwd+bwd peak memory vs the dry run's prediction, routed sampling vs one expert,
# the HunyuanVideo VAE decode with and without tiling, and cp=1 vs cp=2 (>= 2 GPUs). Prints a Markdown table,
# each figure with the command that reproduces it; exits 1 if a step fails, is non-finite, or a peak is
# > 25% over its prediction. No downloads: every model has random weights. <= 8 minutes on one H100/H200.
#
#   launch/gpu_check.sh                      # all sections, on the GPU
#   launch/gpu_check.sh --sections ab        # some of them (a b c d e, see tests/benchmarks/gpu_check.py)
#   launch/gpu_check.sh --smoke              # CPU code-path check, tiny sizes, < 1 minute (also DDM_GPU_CHECK_SMOKE=1)
#
# Runs in the current Python environment (a CUDA build of torch with this project installed, e.g.
# `pip install -e '.[deepspeed]'`); it does not source launch/setup_env.sh, whose venv is CPU-only.
# PYTHON=/path/to/python overrides the interpreter.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
export PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE="${WANDB_MODE:-disabled}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "${PYTHON:-python}" -m tests.benchmarks.gpu_check "$@"
