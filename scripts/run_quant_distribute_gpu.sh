#!/usr/bin/env bash
# Quantize a config with msrun on GPU, NUM_WORKERS worker processes on this machine (data-parallel):
#   bash scripts/run_quant_distribute_gpu.sh NUM_WORKERS CONFIG [DATA_ROOT] [CKPT] [extra quant.py flags...]
#   e.g. bash scripts/run_quant_distribute_gpu.sh 2 configs/deit_fmnist_minmax_w8a8.yaml embedded
DEVICE=GPU
ENTRY=quant.py
source "$(dirname "${BASH_SOURCE[0]}")/_run_common.sh"
run_distribute "$@"
