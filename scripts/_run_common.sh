# Shared body of scripts/run_eval_{cpu,gpu,ascend}.sh; sourced by them after they set DEVICE.
#
#   bash scripts/run_eval_<device>.sh CONFIG [DATA_ROOT] [CKPT] [extra eval.py flags...]
#
# CONFIG, DATA_ROOT and CKPT may be relative to the current folder; eval.py is run from the
# repository root (other relative paths in the extra flags are relative to it). DATA_ROOT may be
# 'embedded' (the Fashion-MNIST copy in assets/) or '' to keep the config's; CKPT may be '' too.
# The output is also written to outputs/logs/eval_<config name>_<timestamp>.log
# ($EVAL_LOG_DIR overrides the folder, $PYTHON the interpreter).

_usage() {
    local script
    script=$(basename "$0")
    [ -n "$1" ] && echo "error: $1" >&2
    echo "usage: bash scripts/$script CONFIG [DATA_ROOT] [CKPT] [extra eval.py flags...]" >&2
    echo "  CONFIG     a YAML file from configs/ (e.g. configs/deit_fmnist_fp.yaml)" >&2
    echo "  DATA_ROOT  ImageNet root with val/<wnid>/*.JPEG, or 'embedded' ('' keeps the config's)" >&2
    echo "  CKPT       weights file: .ckpt, .safetensors, .npz or .pth ('' keeps the config's)" >&2
    echo "  runs: python eval.py --config CONFIG [--data DATA_ROOT] [--ckpt CKPT] --device-target $DEVICE ..." >&2
    exit 1
}

_abspath() {
    case "$1" in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s\n' "$PWD/$1" ;;
    esac
}

run_eval() {
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

    local repo name log_dir log
    repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    cd "$repo" || exit 1
    name=$(basename "$config")
    name=${name%.*}
    log_dir=${EVAL_LOG_DIR:-outputs/logs}
    mkdir -p "$log_dir" || exit 1
    log="$(_abspath "$log_dir")/eval_${name}_$(date +%Y%m%d_%H%M%S).log"
    echo "[$(date '+%F %T')] ${PYTHON:-python} eval.py ${args[*]}" | tee "$log"
    set -o pipefail
    "${PYTHON:-python}" eval.py "${args[@]}" 2>&1 | tee -a "$log"
    local rc=$?
    echo "log: $log (exit code $rc)"
    exit $rc
}
