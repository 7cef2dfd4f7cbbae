#!/usr/bin/env bash
# Reproduce the paper's ImageNet tables: runs the chosen configs and writes
# outputs/reproduce/table.md with the paper's number beside each measured one.
#   bash scripts/reproduce_tables.sh DATA_ROOT CKPT_DIR [--configs 'deit_small_*' ...] [--calib-num 32] [--device-target GPU]
# CKPT_DIR holds <model>.{ckpt,safetensors,npz,pth}, e.g. deit_small_patch16_224.safetensors.
set -euo pipefail
usage() { sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; }
if [ $# -lt 2 ]; then usage; exit 1; fi
DATA_ROOT=$1; CKPT_DIR=$2; shift 2
[ -d "$DATA_ROOT" ] || { echo "error: $DATA_ROOT: data root not found" >&2; usage; exit 1; }
[ -d "$CKPT_DIR" ] || { echo "error: $CKPT_DIR: checkpoint folder not found" >&2; usage; exit 1; }
cd "$(dirname "$0")/.."
mkdir -p outputs/logs
LOG=outputs/logs/reproduce_$(date +%Y%m%d_%H%M%S).log
echo "logging to $LOG"
${PYTHON:-python} scripts/reproduce_tables.py "$DATA_ROOT" "$CKPT_DIR" "$@" 2>&1 | tee "$LOG"
