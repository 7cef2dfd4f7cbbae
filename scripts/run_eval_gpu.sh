#!/usr/bin/env bash
# Evaluate a config on GPU: bash scripts/run_eval_gpu.sh CONFIG [DATA_ROOT] [CKPT] [extra eval.py flags...]
#   e.g. bash scripts/run_eval_gpu.sh configs/deit_small_fp.yaml /data/imagenet deit_small_patch16_224.safetensors
DEVICE=GPU
source "$(dirname "${BASH_SOURCE[0]}")/_run_common.sh"
run_eval "$@"
