#!/usr/bin/env bash
# Quantize a config on CPU: bash scripts/run_quant_cpu.sh CONFIG [DATA_ROOT] [CKPT] [extra quant.py flags...]
#   e.g. bash scripts/run_quant_cpu.sh configs/deit_fmnist_easyquant_w8a8.yaml
DEVICE=CPU
ENTRY=quant.py
source "$(dirname "${BASH_SOURCE[0]}")/_run_common.sh"
run_entry "$@"
