#!/usr/bin/env bash
# Quantize a config on GPU: bash scripts/run_quant_gpu.sh CONFIG [DATA_ROOT] [CKPT] [extra quant.py flags...]
#   e.g. bash scripts/run_quant_gpu.sh configs/deit_small_easyquant_w6a6.yaml /data/imagenet deit_small_patch16_224.safetensors
DEVICE=GPU
ENTRY=quant.py
source "$(dirname "${BASH_SOURCE[0]}")/_run_common.sh"
run_entry "$@"
