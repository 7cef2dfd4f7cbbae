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
#
# scripts/run_<eval|quant>_distribute_<device>.sh take NUM_WORKERS first, check it against the
# data (scripts/check_workers.py: more workers than images is one line and exit 2, nothing
# launched) and launch ENTRY with msrun on this machine (NUM_WORKERS local workers;
# $MASTER_PORT, default 8118, the scheduler's port); each worker logs to <log folder>/msrun_<eval|quant>_<config name>_<timestamp>/worker_N.log
# and rank 0's output is copied to the run's log.

ENTRY=${ENTRY:-eval.py}
_MSRUN_WORKERS=  # set by run_distribute only

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
    set -o pipefail
    if [ -n "$_MSRUN_WORKERS" ]; then
        _run_msrun "$log" "${log%.log}" "${args[@]}"
        exit $?
    fi
    echo "[$(date '+%F %T')] ${PYTHON:-python} $ENTRY ${args[*]}" | tee "$log"
    "${PYTHON:-python}" "$ENTRY" "${args[@]}" 2>&1 | tee -a "$log"
    local rc=$?
    echo "log: $log (exit code $rc)"
    exit $rc
}

# _run_msrun LOG WORKER_LOG_DIR ARGS...: msrun with _MSRUN_WORKERS local workers running ENTRY.
_run_msrun() {
    local log=$1 wlog_dir
    wlog_dir="$(dirname "$2")/msrun_$(basename "$2")"
    shift 2
    local py bin
    py=$(command -v "${PYTHON:-python}") || { echo "error: interpreter not found: ${PYTHON:-python}" >&2; exit 1; }
    bin=$(dirname "$py")
    # msrun starts its workers as 'python ENTRY ...': the interpreter's folder goes first on PATH
    export PATH="$bin:$PATH"
    local cmd=("$py" -m mindspore.parallel.cluster.run --worker_num="$_MSRUN_WORKERS" --local_worker_num="$_MSRUN_WORKERS"
               --master_port="${MASTER_PORT:-8118}" --log_dir="$wlog_dir" --join=True "$ENTRY" "$@")
    # the worker count against the data (and every flag) before any worker starts: one line, exit 2
    "$py" scripts/check_workers.py "$_MSRUN_WORKERS" "$ENTRY" "$@" 2>&1 | tee "$log" >&2
    local checked=${PIPESTATUS[0]}
    if [ "$checked" -ne 0 ]; then
        echo "log: $log (exit code $checked, msrun not launched)"
        return "$checked"
    fi
    echo "[$(date '+%F %T')] ${cmd[*]}" | tee -a "$log"
    "${cmd[@]}" >> "$log" 2>&1
    local rc=$?
    if [ -f "$wlog_dir/worker_0.log" ]; then
        grep -v -E '^\[(INFO|WARNING)\]' "$wlog_dir/worker_0.log" | tee -a "$log"
    fi
    [ $rc -ne 0 ] && grep -h -E '^error:' "$wlog_dir"/worker_*.log 2>/dev/null | sort -u | tee -a "$log" >&2
    echo "log: $log, worker logs: $wlog_dir/ (exit code $rc)"
    return $rc
}

# run_distribute NUM_WORKERS CONFIG [DATA_ROOT] [CKPT] [flags...]: run_entry under msrun.
run_distribute() {
    case "$1" in -h|--help|"") _usage_distribute "${1:+}" ;; esac
    case "$1" in
        *[!0-9]*|0) _usage_distribute "NUM_WORKERS must be a positive integer, got '$1'" ;;
    esac
    _MSRUN_WORKERS=$1
    shift
    run_entry "$@"
}

_usage_distribute() {
    [ -n "$1" ] && echo "error: $1" >&2
    echo "usage: bash scripts/$(basename "$0") NUM_WORKERS CONFIG [DATA_ROOT] [CKPT] [extra $ENTRY flags...]" >&2
    echo "  NUM_WORKERS  worker processes on this machine (msrun); each evaluates a shard of the data" >&2
    echo "  then as the single-process script: bash scripts/run_${ENTRY%.py}_$(printf '%s' "$DEVICE" | tr '[:upper:]' '[:lower:]').sh --help" >&2
    exit 1
}

run_eval() {
    ENTRY=eval.py
    run_entry "$@"
}

run_quant() {
    ENTRY=quant.py
    run_entry "$@"
}
