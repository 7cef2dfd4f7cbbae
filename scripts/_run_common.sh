# Shared body of scripts/run_{eval,quant}_{cpu,gpu,ascend}.sh; sourced by them after they set
# DEVICE (CPU, GPU or Ascend) and ENTRY (eval.py or quant.py; eval.py when unset).
#
#   bash scripts/run_<eval|quant>_<device>.sh CONFIG [DATA_ROOT] [CKPT] [extra ENTRY flags...]
#
# CONFIG, DATA_ROOT and CKPT may be relative to the current folder; ENTRY is run from the
# repository root (other relative paths in the extra flags are relative to it). DATA_ROOT may be
# 'embedded' (the Fashion-MNIST copy in assets/) or '' to keep the config's; CKPT may be '' too.
# The output is also written to outputs/logs/<eval|quant>_<config name>_<timestamp>.log
# ($EVAL_LOG_DIR / $QUANT_LOG_DIR, else $RUN_LOG_DIR, override the folder; $PYTHON the interpreter).

ENTRY=${ENTRY:-eval.py}

_usage() {
    local script example layout="val/<wnid>/*.JPEG"
    script=$(basename "$0")
    case "$ENTRY" in
        quant.py) example=configs/deit_fmnist_easyquant_w8a8.yaml; layout="train/ and val/<wnid>/*.JPEG" ;;
        *) example=configs/deit_fmnist_fp.yaml ;;
    esac
    [ -n "$1" ] && echo "error: $1" >&2
    echo "usage: bash scripts/$script CONFIG [DATA_ROOT] [CKPT] [extra $ENTRY flags...]" >&2
    echo "  CONFIG     a YAML file from configs/ (e.g. $example)" >&2
    echo "  DATA_ROOT  ImageNet root with $layout, or 'embedded' ('' keeps the config's)" >&2
    echo "  CKPT       weights file: .ckpt, .safetensors, .npz or .pth ('' keeps the config's)" >&2
    echo "  runs: python $ENTRY --config CONFIG [--data DATA_ROOT] [--ckpt CKPT] --device-target $DEVICE ..." >&2
    exit 1
}

_abspath() {
    case "$1" in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s\n' "$PWD/$1" ;;
    esac
}

# run_entry CONFIG [DATA_ROOT] [CKPT] [flags...]: python $ENTRY with them, logged.
run_entry() {
    case "$ENTRY" in
        eval.py|quant.py) ;;
        *) echo "error: ENTRY is '$ENTRY'; expected eval.py or quant.py" >&2; exit 1 ;;
    esac
    [ $# -ge 1 ] || _usage "no CONFIG given"
    case "$1" in -h|--help) _usage ;; esac
    local config=$1 data="" ckpt=""
    shift
    [ -f "$config" ] || _usage "config file not found: $config"
    config=$(_abspath "$config")
    if [ $# -ge 1 ] && [ "${1#-}" = "$1" ]; then  # DATA_ROOT (not a flag)
        data=$1
        shift
        if [ -n "$data" ] && [ "$data" != "embedded" ]; then
            [ -d "$data" ] || _usage "data root not found: $data"
            data=$(_abspath "$data")
        fi
        if [ $# -ge 1 ] && [ "${1#-}" = "$1" ]; then  # CKPT (not a flag)
            ckpt=$1
            shift
            if [ -n "$ckpt" ]; then
                [ -f "$ckpt" ] || _usage "checkpoint not found: $ckpt"
                ckpt=$(_abspath "$ckpt")
            fi
        fi
    fi
    local args=(--config "$config")
    [ -n "$data" ] && args+=(--data "$data")
    [ -n "$ckpt" ] && args+=(--ckpt "$ckpt")
    args+=(--device-target "$DEVICE" "$@")

    local repo name kind dir_var log_dir log
    repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    cd "$repo" || exit 1
    name=$(basename "$config")
    name=${name%.*}
    kind=${ENTRY%.py}
    dir_var=$(printf '%s' "$kind" | tr '[:lower:]' '[:upper:]')_LOG_DIR
    log_dir=${!dir_var:-${RUN_LOG_DIR:-outputs/logs}}
    mkdir -p "$log_dir" || exit 1
    log="$(_abspath "$log_dir")/${kind}_${name}_$(date +%Y%m%d_%H%M%S).log"
    echo "[$(date '+%F %T')] ${PYTHON:-python} $ENTRY ${args[*]}" | tee "$log"
    set -o pipefail
    "${PYTHON:-python}" "$ENTRY" "${args[@]}" 2>&1 | tee -a "$log"
    local rc=$?
    echo "log: $log (exit code $rc)"
    exit $rc
}

run_eval() {
    ENTRY=eval.py
    run_entry "$@"
}

run_quant() {
    ENTRY=quant.py
    run_entry "$@"
}
