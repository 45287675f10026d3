#!/usr/bin/env bash
# Runs a GenMask-JAX command on every worker of a Cloud TPU VM slice.
#
#   bash launch/tpu.sh --name genmask-v5e64 --zone us-west4-a --accelerator v5litepod-64 \
#       [--version v2-alpha-tpuv5-lite] [--project P] [--spot] [--create] [--delete] [--dry-run] \
#       -- python -m genmask_jax.train --config=configs/genmask.py:variant=paper --workdir=gs://bucket/run1
#
# Steps: create the slice if --create and it does not exist; copy the code (git HEAD plus the working
# tree's changes) to every worker; make a venv there with uv (Python $PYTHON_VERSION, default 3.12) and
# install jax[tpu] and requirements.txt, any failing step stopping the worker; run the command on all
# workers at once with JAX's distributed runtime on (jax.distributed.initialize() finds the coordinator
# on TPU by itself); stream every worker's output; delete the slice if --delete, whether the command or
# an earlier step failed or was interrupted (the exit status stays the command's or the failed step's).
# --dry-run prints each gcloud command instead of running it.
set -euo pipefail
SCRIPT="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")/.."  # the bundle is this repository's files (git ls-files)

NAME="" ZONE="" ACCEL="" VERSION="" PROJECT="" SPOT=0 CREATE=0 DELETE=0 DRY=0
JAX_TPU_SPEC="${JAX_TPU_SPEC:-jax[tpu]>=0.10.2,<0.11}"
REMOTE_DIR="${REMOTE_DIR:-genmask_jax_run}"
UV_SPEC="${UV_SPEC:-uv>=0.9,<1}"
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"

usage() { sed -n '2,/^set -/p' "$SCRIPT" | sed '$d' | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
# A flag's value must be there: `--zone --create` would otherwise take the next flag as its value.
need_value() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || { echo "tpu.sh: $1 needs a value" >&2; exit 2; }; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) need_value "$@"; NAME="$2"; shift 2 ;;
    --zone) need_value "$@"; ZONE="$2"; shift 2 ;;
    --accelerator) need_value "$@"; ACCEL="$2"; shift 2 ;;
    --version) need_value "$@"; VERSION="$2"; shift 2 ;;
    --project) need_value "$@"; PROJECT="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --create) CREATE=1; shift ;;
    --delete) DELETE=1; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "tpu.sh: unknown flag $1" >&2; usage ;;
  esac
done
CMD=("$@")

[[ -n "$NAME" && -n "$ZONE" ]] || { echo "tpu.sh: --name and --zone are required" >&2; exit 2; }
[[ ${#CMD[@]} -gt 0 || $CREATE -eq 1 || $DELETE -eq 1 ]] || {
  echo "tpu.sh: nothing to do (give a command after --, or --create / --delete)" >&2; exit 2; }
[[ $CREATE -eq 0 || -n "$ACCEL" ]] || { echo "tpu.sh: --create needs --accelerator" >&2; exit 2; }

if [[ -z "$VERSION" ]]; then
  case "$ACCEL" in
    v5litepod-*|v5e-*) VERSION="v2-alpha-tpuv5-lite" ;;
    v5p-*) VERSION="v2-alpha-tpuv5" ;;
    v6e-*) VERSION="v2-alpha-tpuv6e" ;;
    *) VERSION="tpu-ubuntu2204-base" ;;
  esac
fi

GC=(gcloud compute tpus tpu-vm)
LOC=(--zone "$ZONE")
[[ -n "$PROJECT" ]] && LOC+=(--project "$PROJECT")

run() {  # prints in dry-run mode, runs otherwise
  if [[ $DRY -eq 1 ]]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi
}

bundle_dir=""
finish() {
  local rc=$? delete_rc=0
  [[ -z "$bundle_dir" ]] || rm -rf "$bundle_dir"
  if [[ $DELETE -eq 1 ]]; then
    # A failed command must not leave the slice billing.
    run "${GC[@]}" delete "$NAME" "${LOC[@]}" --quiet || delete_rc=$?
    if [[ $delete_rc -ne 0 ]]; then
      echo "tpu.sh: deleting $NAME failed; delete it with: ${GC[*]} delete $NAME ${LOC[*]}" >&2
      [[ $rc -ne 0 ]] || rc=$delete_rc
    fi
  fi
  exit "$rc"
}
trap finish EXIT

if [[ $CREATE -eq 1 ]]; then
  if [[ $DRY -eq 1 ]] || ! "${GC[@]}" describe "$NAME" "${LOC[@]}" >/dev/null 2>&1; then
    # One array, no optional empty one: "${empty[@]}" under set -u fails in bash < 4.4 (macOS's bash 3.2).
    create=("${GC[@]}" create "$NAME" "${LOC[@]}" --accelerator-type "$ACCEL" --version "$VERSION")
    [[ $SPOT -eq 1 ]] && create+=(--spot)
    run "${create[@]}"
  else
    echo "[tpu.sh] reusing existing slice $NAME"
  fi
fi

if [[ ${#CMD[@]} -gt 0 ]]; then
  if [[ $DRY -eq 1 ]]; then
    bundle="${TMPDIR:-/tmp}/tmp.XXXXXXXXXX/genmask_jax.tar.gz"
    echo "+ tar -czf $bundle (git ls-files: tracked and untracked-not-ignored files that exist)"
  else
    bundle_dir="$(mktemp -d)"
    bundle="$bundle_dir/genmask_jax.tar.gz"
    # --cached also lists tracked files deleted in the working tree, which tar cannot read.
    git ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' f; do if [[ -e $f || -L $f ]]; then printf '%s\0' "$f"; fi; done |
      tar -czf "$bundle" --null -T -
  fi
  run "${GC[@]}" scp "$bundle" "$NAME:~/genmask_jax.tar.gz" "${LOC[@]}" --worker=all
  quoted="$(printf ' %q' "${CMD[@]}")"
  # What every worker runs, one step a line, joined with ";" under `set -eo pipefail` so that any failing
  # step stops the worker. TPU VM images ship Python 3.10 (Ubuntu 22.04) and jax 0.10 needs >= 3.11:
  # uv (from PyPI, else its installer) makes the venv with a Python 3.12 it downloads if need be.
  # shellcheck disable=SC2016  # $HOME, $PWD and $PATH are the worker's
  steps=(
    "set -eo pipefail"
    "mkdir -p ~/$REMOTE_DIR"
    "cd ~/$REMOTE_DIR"
    # Files the previous bundle shipped and this one does not (deleted or renamed here) are removed, so a
    # stale module cannot be imported; anything else there (the venv, runs) is left alone, and a failed
    # removal never stops the launch. Directory entries (a nested repository's) are not listed.
    "tar --quoting-style=literal -tzf ~/genmask_jax.tar.gz | sed '/\\/\$/d' | sort > .bundle-files.new"
    "if [ -f .bundle-files ]; then sort .bundle-files | comm -23 - .bundle-files.new | tr '\\n' '\\0' | xargs -0 -r rm -f -- || true; fi"
    "mv .bundle-files.new .bundle-files"
    "tar -xzf ~/genmask_jax.tar.gz"
    'export PATH="$HOME/.local/bin:$PATH"'
    "command -v uv >/dev/null || python3 -m pip install -q --user '$UV_SPEC' || curl -LsSf https://astral.sh/uv/install.sh | sh"
    "uv --version"
    "if ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then rm -rf .venv; uv venv -q --seed --python $PYTHON_VERSION .venv; fi"
    ".venv/bin/python -c 'import sys; assert sys.version_info >= (3, 11), \"jax 0.10 needs Python >= 3.11, the venv has \" + sys.version'"
    "uv pip install -q --python .venv/bin/python '$JAX_TPU_SPEC' -r requirements.txt"
    "uv pip install -q --python .venv/bin/python --no-deps -e ."
    'export PATH="$PWD/.venv/bin:$PATH" VIRTUAL_ENV="$PWD/.venv" GENMASK_DISTRIBUTED=1 PYTHONUNBUFFERED=1'
    "${quoted# }"
  )
  remote="$(IFS=';'; echo "${steps[*]}")"
  run "${GC[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command "$remote"
fi
