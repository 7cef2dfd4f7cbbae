#!/usr/bin/env bash
# Evaluate a config on CPU: bash scripts/run_eval_cpu.sh CONFIG [DATA_ROOT] [CKPT] [extra eval.py flags...]
#   e.g. bash scripts/run_eval_cpu.sh configs/deit_small_fp.yaml /data/imagenet deit_small_patch16_224.safetensors
DEVICE=CPU
source "$(dirname "${BASH_SOURCE[0]}")/_run_common.sh"
run_eval "$@"
