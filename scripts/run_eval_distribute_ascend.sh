#!/usr/bin/env bash
# Eval a config with msrun on Ascend, NUM_WORKERS worker processes on this machine (data-parallel):
#   bash scripts/run_eval_distribute_ascend.sh NUM_WORKERS CONFIG [DATA_ROOT] [CKPT] [extra eval.py flags...]
#   e.g. bash scripts/run_eval_distribute_ascend.sh 2 configs/deit_fmnist_fp.yaml embedded
DEVICE=Ascend
ENTRY=eval.py
source "$(dirname "${BASH_SOURCE[0]}")/_run_common.sh"
run_distribute "$@"
