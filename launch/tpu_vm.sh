#!/usr/bin/env bash
# Run a tok1d config on a Cloud TPU VM (single host or pod slice): create, copy the source,
# install, run on all workers, tail logs, delete.
#
#   launch/tpu_vm.sh [--dry-run] create  NAME ZONE ACCELERATOR [--spot]
#   launch/tpu_vm.sh [--dry-run] setup   NAME ZONE
#   launch/tpu_vm.sh [--dry-run] run     NAME ZONE CONFIG WORKDIR [--config.x=y ...]
#   launch/tpu_vm.sh [--dry-run] tail    NAME ZONE [WORKER]
#   launch/tpu_vm.sh [--dry-run] delete  NAME ZONE
#
# --dry-run (anywhere among the arguments) prints the commands instead of running them.
#
# `run` starts the same command on every worker (required: all hosts must join
# jax.distributed), with TOK1D_DISTRIBUTED=1 (auto-detected coordinator), a persistent
# compilation cache on the VM's local disk and the workdir where you point it (a local path:
# mount a bucket with gcsfuse --implicit-dirs --rename-dir-limit=200000, e.g. at /gcs/BUCKET,
# to keep it past the VMs; gs:// paths are refused). Data: set TFDS_DATA_DIR / --config.data.data_dir to a local disk or gcsfuse
# mount holding the array_record files.
# `setup` makes the environment with Python >= 3.11 (tok1d's and jax's minimum): python3 where
# it is new enough, else python3.12 / python3.11, else python3.11 from the deadsnakes PPA
# (tpu-ubuntu2204-base ships 3.10). `run` refuses to start while a run is going on any worker
# (a second one took over the first one's coordinator) and appends to ~/tok1d.log.
# Environment: TOK1D_PROJECT (gcloud project), TOK1D_TPU_VERSION (runtime, default
# tpu-ubuntu2204-base), TOK1D_REMOTE_DIR (default tok1d).
set -euo pipefail

DRY_RUN=0  # --dry-run anywhere among the arguments
ARGS=()
for arg in "$@"; do
  if [[ "$arg" == "--dry-run" ]]; then DRY_RUN=1; else ARGS+=("$arg"); fi
done
set -- ${ARGS[@]+"${ARGS[@]}"}

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit "${1:-1}"; }
bad() { echo "tpu_vm.sh: $*" >&2; usage 2 >&2; }  # one line naming the problem, then the usage
run() {
  if [[ $DRY_RUN == 1 ]]; then printf '%q ' "$@"; printf '\n'; else "$@"; fi
}

CMD=${1:-}; [[ -n "$CMD" ]] || usage
shift
REMOTE=${TOK1D_REMOTE_DIR:-tok1d}
PROJECT_FLAG=()
[[ -n "${TOK1D_PROJECT:-}" ]] && PROJECT_FLAG=(--project "$TOK1D_PROJECT")
REPO=$(cd "$(dirname "$0")/.." && pwd)

case "$CMD" in
  create)
    [[ $# -ge 3 ]] || bad "create needs NAME ZONE ACCELERATOR [--spot]"
    NAME=$1 ZONE=$2 ACC=$3; shift 3
    EXTRA=(); [[ "${1:-}" == "--spot" ]] && EXTRA=(--spot) && shift
    [[ $# -eq 0 ]] || bad "create: unknown argument(s) $* (only --spot follows the accelerator)"
    run gcloud compute tpus tpu-vm create "$NAME" --zone "$ZONE" ${PROJECT_FLAG[@]+"${PROJECT_FLAG[@]}"} \
      --accelerator-type "$ACC" --version "${TOK1D_TPU_VERSION:-tpu-ubuntu2204-base}" ${EXTRA[@]+"${EXTRA[@]}"}
    ;;
  setup)
    [[ $# -eq 2 ]] || bad "setup needs NAME ZONE (and nothing else)"
    # (on the worker) PY: a Python >= 3.11, installed from deadsnakes where there is none.
    NEW_ENOUGH="-c 'import sys; sys.exit(sys.version_info < (3, 11))'"
    PICK_PYTHON="{ PY=; for p in python3 python3.12 python3.11; do command -v \$p > /dev/null \
&& \$p $NEW_ENOUGH && PY=\$p && break; done; if [ -z \"\$PY\" ]; then \
sudo apt-get update -qq && sudo apt-get install -y -qq software-properties-common \
&& sudo add-apt-repository -y ppa:deadsnakes/ppa && sudo apt-get install -y -qq python3.11 \
python3.11-venv && PY=python3.11; fi; [ -n \"\$PY\" ] \
|| { echo \"\$(hostname): no Python >= 3.11 (tok1d needs it)\" >&2; false; }; }"
    NAME=$1 ZONE=$2
    # The source only (git's tracked and not-ignored files: no .venv, .git or workdirs), as one
    # archive unpacked into ~/$REMOTE, so that a second `setup` updates the code in place.
    ARCHIVE=${TMPDIR:-/tmp}/tok1d-src-$NAME.tar.gz
    TOP=$(git -C "$REPO" rev-parse --show-toplevel 2> /dev/null || true)  # (worktrees too)
    if [[ -n "$TOP" && "$(cd "$TOP" && pwd -P)" == "$(cd "$REPO" && pwd -P)" ]]; then
      run bash -c 'cd "$1" && git ls-files -z -co --exclude-standard |
        while IFS= read -r -d "" f; do [[ -e "$f" ]] && printf "%s\0" "$f"; done |
        tar --null -T - -czf "$2"' _ "$REPO" "$ARCHIVE"
    else
      run tar -czf "$ARCHIVE" -C "$REPO" --exclude=.venv --exclude=.git \
        --exclude=__pycache__ --exclude='*.egg-info' .
    fi
    run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$NAME:tok1d-src.tar.gz" --zone "$ZONE" \
      ${PROJECT_FLAG[@]+"${PROJECT_FLAG[@]}"} --worker=all
    run rm -f "$ARCHIVE"
    run gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" ${PROJECT_FLAG[@]+"${PROJECT_FLAG[@]}"} --worker=all \
      --command "mkdir -p $REMOTE && tar -xzf tok1d-src.tar.gz -C $REMOTE && rm tok1d-src.tar.gz && cd $REMOTE && $PICK_PYTHON && \$PY -m venv .venv && . .venv/bin/activate && pip install -U pip && pip install -e '.[tpu]' && python -c 'import jax; print(jax.__version__, jax.device_count())'"
    ;;
  run)
    [[ $# -ge 4 ]] || bad "run needs NAME ZONE CONFIG WORKDIR [--config.x=y ...]"
    NAME=$1 ZONE=$2 CONFIG=$3 WORKDIR=$4; shift 4
    OVERRIDES=""  # (printf of no arguments would pass one empty argument)
    if [[ $# -gt 0 ]]; then OVERRIDES=$(printf '%q ' "$@"); fi
    # First on every worker: no run going (a second one joined the first one's coordinator
    # and both died) and the environment there. Then the run, in the background (the command
    # returns at once; ssh's exit status is the start's, not the run's).
    CHECK_CMD="if pgrep -f 'python -m [t]ok1d[.]main' > /dev/null; then echo \"\$(hostname): a tok1d run is going (launch/tpu_vm.sh tail; stop it with pkill -f tok1d.main)\" >&2; exit 1; fi; [ -f $REMOTE/.venv/bin/activate ] || { echo \"\$(hostname): no ~/$REMOTE/.venv: run launch/tpu_vm.sh setup first\" >&2; exit 1; }"
    MAIN=$(printf '%q ' python -m tok1d.main "--config=$CONFIG" "--workdir=$WORKDIR")
    REMOTE_CMD="cd $REMOTE && . .venv/bin/activate && export TOK1D_DISTRIBUTED=1 && echo \"=== \$(date -u) $MAIN$OVERRIDES\" >> \$HOME/tok1d.log && { nohup $MAIN$OVERRIDES >> \$HOME/tok1d.log 2>&1 < /dev/null & }"
    run gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" ${PROJECT_FLAG[@]+"${PROJECT_FLAG[@]}"} --worker=all \
      --command "$CHECK_CMD"
    run gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" ${PROJECT_FLAG[@]+"${PROJECT_FLAG[@]}"} --worker=all \
      --command "$REMOTE_CMD"
    ;;
  tail)
    [[ $# -ge 2 && $# -le 3 ]] || bad "tail needs NAME ZONE [WORKER]"
    NAME=$1 ZONE=$2 WORKER=${3:-0}
    run gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" ${PROJECT_FLAG[@]+"${PROJECT_FLAG[@]}"} \
      --worker="$WORKER" --command "tail -n 100 -f \$HOME/tok1d.log"
    ;;
  delete)
    [[ $# -eq 2 ]] || bad "delete needs NAME ZONE"
    run gcloud compute tpus tpu-vm delete "$1" --zone "$2" ${PROJECT_FLAG[@]+"${PROJECT_FLAG[@]}"} --quiet
    ;;
  -h|--help|help) usage 0 ;;
  *) bad "unknown command: $CMD" ;;
esac
