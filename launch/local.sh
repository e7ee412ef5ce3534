#!/usr/bin/env bash
# launch/local.sh: Self-Harmony training on this machine (CPU or GPUs). The trainer starts its own local Ray.
#
# Usage:
#     launch/local.sh CONFIG [--resume] [key=value ...]
#     HARMONY_VENV=/work/venv launch/local.sh configs/cpu_tiny.yaml model.hf_path=runs/demo/model/hf
#     CUDA_VISIBLE_DEVICES=0,1 launch/local.sh configs/recipes/X.yaml
#
# - Run dir: logging.run_dir=... if given, else HARMONY_RUN_DIR, else the config's logging.run_dir. The trainer's
#   output goes to the terminal and to RUN_DIR/logs/train.local.<timestamp>.log (when the run dir is known here,
#   i.e. the first two cases; otherwise only to the terminal).
# - GPUs: Ray sees the GPUs CUDA_VISIBLE_DEVICES leaves visible; with none, everything runs on CPU.
# - CPU count: Ray gives every Megatron rank and every CPU vLLM engine one logical CPU. The trainer's local Ray
#   already advertises at least tp*pp*dp + engines of them; HARMONY_RAY_CPUS=N (-> ray.num_cpus=N) asks for more.
# - Signals: Ctrl-C (INT), TERM and USR1 are forwarded to the trainer, which finishes its step, writes a checkpoint
#   and exits 75 (during start-up it stops at once: no step ran, nothing to checkpoint); run the same command again
#   with --resume to continue. A second Ctrl-C stops it at once, without a checkpoint (exit 130). The trainer runs
#   in a session of its own (setsid), so a Ctrl-C in the terminal reaches it once, through this script, and never
#   reaches Ray's or vLLM's processes directly; every process of the run is stopped before the trainer exits.
# - Exit status: the trainer's (0 done, 75 stopped by a signal with a checkpoint, 130 stopped at once by a second
#   Ctrl-C, 2 bad input or config, 1 a failure it reports).
#
# Variables:
#   HARMONY_VENV       a virtualenv whose bin/ is put first on PATH (needs harmony-mcore). Default: use PATH.
#   HARMONY_RUN_DIR    the run dir (adds logging.run_dir=...)
#   HARMONY_RAY_CPUS   logical CPUs of the local Ray cluster (adds ray.num_cpus=...)
set -euo pipefail

if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
    exit 2
fi
config="$1"
shift
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${HARMONY_VENV:-}" ]]; then
    PATH="$HARMONY_VENV/bin:$PATH"
fi
command -v harmony-mcore >/dev/null || { echo "harmony-mcore not on PATH (set HARMONY_VENV)" >&2; exit 1; }
export PATH PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false

flags=()     # --resume, hoisted in front of the key=value list (argparse stops at a flag after positionals)
overrides=()
extra=()
run_dir="${HARMONY_RUN_DIR:-}"
[[ -n "$run_dir" ]] && extra+=("logging.run_dir=$run_dir")
own_ray=1
for arg in "$@"; do
    case "$arg" in
        --resume) flags=(--resume); continue ;;
        logging.run_dir=*) run_dir="${arg#logging.run_dir=}" ;;
        ray.address=?*) own_ray=0 ;;
    esac
    overrides+=("$arg")
done
[[ -n "${HARMONY_RAY_CPUS:-}" ]] && extra+=("ray.num_cpus=$HARMONY_RAY_CPUS")
if ((own_ray)); then  # ray.init() would join a cluster named by a stray RAY_ADDRESS instead of starting its own
    unset RAY_ADDRESS
fi

log_file=/dev/null
if [[ -n "$run_dir" ]]; then
    mkdir -p "$run_dir/logs"
    log_file="$run_dir/logs/train.local.$(date +%Y%m%d-%H%M%S).log"
fi

train_pid=""
interrupted=0
ints=0
forward() {  # forward(SIGNAL): runs in the trap; `wait` below then returns early and is re-entered
    interrupted=1
    if [[ "$1" == INT ]] && ((ints++ > 0)); then
        echo "[local.sh] SIGINT again: the trainer (pid $train_pid) stops at once, without a checkpoint" >&2
    else
        echo "[local.sh] SIG$1: the trainer (pid $train_pid) finishes its step, checkpoints and exits 75" >&2
    fi
    [[ -n "$train_pid" ]] && kill -s "$1" "$train_pid" 2>/dev/null || true
}
trap 'forward INT' INT
trap 'forward TERM' TERM
trap 'forward USR1' USR1
session=()  # its own session: the terminal's Ctrl-C reaches it once, forwarded from here
command -v setsid >/dev/null && session=(setsid)

echo "[local.sh] harmony-mcore train --config $config ${flags[*]:-} ${extra[*]:-} ${overrides[*]:-}" >&2
# extra first: explicit key=value arguments win. tee ignores the signals so that output keeps flowing.
"${session[@]}" harmony-mcore train --config "$config" "${flags[@]}" "${extra[@]}" "${overrides[@]}" \
    > >(trap '' INT TERM USR1; exec tee -a "$log_file") 2>&1 &
train_pid=$!
rc=0
while :; do  # `wait` returns early whenever a trap ran; wait again (bash keeps the exit status) until it exits
    interrupted=0
    wait "$train_pid" && rc=0 || rc=$?
    ((interrupted)) || break
done
if ((rc == 75)); then
    echo "[local.sh] checkpointed and stopped; continue with: $0 $config --resume ${extra[*]:-} ${overrides[*]:-}" >&2
fi
exit "$rc"
