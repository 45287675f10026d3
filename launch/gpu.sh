#!/usr/bin/env bash
# Runs a GenMask-JAX command on GPUs with jax[cuda]: one process per node, owning all its GPUs.
#
# One node:
#   bash launch/gpu.sh -- python -m genmask_jax.train --config=configs/genmask.py:variant=paper --workdir=runs/x
# Several nodes (run the same line on every node, or under SLURM: `srun --ntasks-per-node=1 bash
# launch/gpu.sh -- ...`, which fills the three flags from the step's SLURM_* variables; outside an srun
# step, in a batch script or an salloc shell, it runs one process):
#   bash launch/gpu.sh --coordinator node0:12355 --num-processes 4 --process-id $RANK -- python -m ...
# Flags: --cuda 12|13 (the jax extra, default 12), --venv DIR (default .venv-cuda in the repository),
#        --no-install, --dry-run (print the set-up and the command instead of running them).
# The command runs in the directory this script is called from: its relative paths (--workdir=runs/x,
# data paths, a --venv DIR) are the caller's, wherever the repository is.
# Process 0 installs into the venv (skipped while requirements.txt and pyproject.toml are unchanged);
# the others wait up to GENMASK_INSTALL_WAIT_S seconds (default 1800) for it, so several nodes can share
# one venv on a shared file system (a venv on node-local disks: set it up on each node first, then
# --no-install). The venv is made with $PYTHON (default python3), which must be Python >= 3.11. The command
# runs with the venv first on PATH, so `env VAR=1 python ...` or `nsys profile python ...` use its python.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

CUDA=12 VENV="$ROOT/.venv-cuda" INSTALL=1 DRY=0 COORD="" NPROC="" PID=""
PORT="${GENMASK_COORDINATOR_PORT:-12355}"
INSTALL_WAIT_S="${GENMASK_INSTALL_WAIT_S:-1800}"
PYTHON="${PYTHON:-python3}"

usage() { sed -n '2,/^set -/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
die() { echo "gpu.sh: $*" >&2; exit 2; }
# A flag's value must be there: `--process-id --` would otherwise take the next flag as its value.
need_value() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --cuda) need_value "$@"; CUDA="$2"; shift 2 ;;
    --venv) need_value "$@"; VENV="$2"; shift 2 ;;
    --no-install) INSTALL=0; shift ;;
    --coordinator) need_value "$@"; COORD="$2"; shift 2 ;;
    --num-processes) need_value "$@"; NPROC="$2"; shift 2 ;;
    --process-id) need_value "$@"; PID="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "gpu.sh: unknown flag $1" >&2; usage ;;
  esac
done
CMD=("$@")
[[ ${#CMD[@]} -gt 0 ]] || die "give the command to run after --"
[[ "$CUDA" == 12 || "$CUDA" == 13 ]] || die "--cuda must be 12 or 13"
[[ "$INSTALL_WAIT_S" =~ ^[0-9]+$ ]] ||
  die "GENMASK_INSTALL_WAIT_S must be a whole number of seconds, got '$INSTALL_WAIT_S'"
# Absolute, since the venv goes on PATH and the command may change directory.
[[ "$VENV" == /* ]] || VENV="$PWD/$VENV"

# Inside an srun step of several tasks, the step's first node coordinates. A batch script or an salloc
# shell also has SLURM_NTASKS > 1 but is one process: making it process 0 of SLURM_NTASKS would leave it
# waiting for peers that never start.
if [[ -z "$COORD" && -n "${SLURM_STEP_ID:-}" && "${SLURM_STEP_NUM_TASKS:-1}" -gt 1 ]]; then
  if [[ "${SLURM_LOCALID:-0}" -gt 0 ]]; then
    echo "gpu.sh: runs one process per node that owns all its GPUs; start it with srun --ntasks-per-node=1" >&2
    exit 2
  fi
  first="$(scontrol show hostnames "$SLURM_STEP_NODELIST" | head -n1)"
  COORD="$first:$PORT" NPROC="$SLURM_STEP_NUM_TASKS" PID="$SLURM_PROCID"
elif [[ -z "$COORD" && "${SLURM_NTASKS:-1}" -gt 1 ]]; then
  echo "[gpu.sh] SLURM_NTASKS=$SLURM_NTASKS but not in an srun step of several tasks: running one process on" \
    "this node's GPUs (a multi-process run needs srun --ntasks-per-node=1 bash launch/gpu.sh ...)" >&2
fi
if [[ -n "$COORD" || -n "$NPROC" || -n "$PID" ]]; then
  [[ -n "$COORD" && -n "$NPROC" && -n "$PID" ]] ||
    die "multi-node needs --coordinator, --num-processes and --process-id together"
  [[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "--num-processes must be a whole number >= 1, got '$NPROC'"
  [[ "$PID" =~ ^(0|[1-9][0-9]*)$ && "$PID" -lt "$NPROC" ]] ||
    die "--process-id must be a whole number from 0 to $((NPROC - 1)) (--num-processes $NPROC), got '$PID'"
  export GENMASK_DISTRIBUTED=1 GENMASK_COORDINATOR_ADDRESS="$COORD" \
    GENMASK_NUM_PROCESSES="$NPROC" GENMASK_PROCESS_ID="$PID"
fi
export PYTHONUNBUFFERED=1
# Let XLA use most of the GPU memory but leave room for cuDNN workspaces.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"

run() { if [[ $DRY -eq 1 ]]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi; }

if [[ $INSTALL -eq 1 ]]; then
  JAX_SPEC="jax[cuda$CUDA]>=0.10.2,<0.11"
  stamp="$VENV/.installed-gpu"
  want="$({ echo "$JAX_SPEC"; cat "$ROOT/requirements.txt" "$ROOT/pyproject.toml"; } | sha256sum | cut -d' ' -f1)"
  have() { [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; }
  if [[ "${PID:-0}" -eq 0 ]]; then
    if ! have; then
      if [[ ! -x "$VENV/bin/python" ]]; then
        "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || {
          echo "gpu.sh: jax 0.10 needs Python >= 3.11, $PYTHON is $("$PYTHON" --version 2>&1 | head -n1);" \
            "set PYTHON=python3.12 (or a cluster module's python)" >&2; exit 2; }
        run "$PYTHON" -m venv "$VENV"
      fi
      run rm -f "$stamp"
      run "$VENV/bin/pip" install -q "$JAX_SPEC" -r "$ROOT/requirements.txt"
      run "$VENV/bin/pip" install -q --no-deps -e "$ROOT"
      if [[ $DRY -eq 1 ]]; then echo "+ echo $want > $stamp"; else echo "$want" > "$stamp"; fi
    fi
  elif [[ $DRY -eq 1 ]]; then
    echo "+ wait until $stamp holds $want (process 0 installs)"
  else
    deadline=$((SECONDS + INSTALL_WAIT_S))
    until have; do
      if (( SECONDS >= deadline )); then
        echo "gpu.sh: process $PID waited ${INSTALL_WAIT_S}s for process 0 to install into $VENV" \
          "($stamp); see process 0's log, and check that $VENV is on a file system every node shares" >&2
        exit 1
      fi
      sleep 2
    done
  fi
fi
export PATH="$VENV/bin:$PATH" VIRTUAL_ENV="$VENV"
if [[ $DRY -eq 1 ]]; then
  env | grep -E '^GENMASK_' | sort | sed 's/^/+ export /' || true
  echo "+ export PATH=$VENV/bin:\$PATH VIRTUAL_ENV=$VENV"
fi
if [[ "${CMD[0]}" == python || "${CMD[0]}" == python3 ]]; then CMD[0]="$VENV/bin/python"; fi
run "${CMD[@]}"
