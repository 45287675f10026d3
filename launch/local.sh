#!/usr/bin/env bash
# One-machine entry point: sets up .venv (once per requirements change) and runs a job.
#   bash launch/local.sh demo [flags]   the built-in demo on synthetic data, tiny model, CPU
#   bash launch/local.sh test [pytest args]
#   bash launch/local.sh python -m genmask_jax.<module> [flags]
# `demo` and `python` run in the directory this script is called from (their relative paths, such as
# --workdir runs/demo, are the caller's); `test` runs in the repository (pytest paths are relative to it).
# The venvs are in the repository (GENMASK_VENV, GENMASK_TEST_VENV: relative to it, or absolute).
# The venv is made with $PYTHON (default python3), which must be Python >= 3.11 (jax 0.10); a venv
# with an older Python is made again.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

# The runtime and the tests get separate environments: the tests add torch, diffusers and libtpu
# (for compiling TPU programs on this machine), which a CPU/GPU run should not load.
in_repo() { if [[ "$1" == /* ]]; then echo "$1"; else echo "$ROOT/$1"; fi; }
VENV="$(in_repo "${GENMASK_VENV:-.venv}")"
TEST_VENV="$(in_repo "${GENMASK_TEST_VENV:-.venv-test}")"
PYTHON="${PYTHON:-python3}"

requirement_files() {  # $1 and the files it includes with -r (relative to $1's folder), recursively
  echo "$1"
  local inc
  sed -n 's/^-r[[:space:]]*\([^[:space:]#]*\).*/\1/p' "$1" | while read -r inc; do
    if [[ "$inc" == /* ]]; then requirement_files "$inc"; else requirement_files "$(dirname "$1")/$inc"; fi
  done
}

contents_digest() {  # sha256 of the files named on stdin, one a line, in that order
  local f
  while IFS= read -r f; do cat "$f"; done | sha256sum | cut -d' ' -f1
}

python_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }
python_version() { if command -v "$1" >/dev/null; then "$1" --version 2>&1 | head -n1; else echo "not found"; fi; }
check_python() {
  python_ok "$PYTHON" || { echo "local.sh: jax 0.10 needs Python >= 3.11, $PYTHON is $(python_version "$PYTHON");" \
    "run with PYTHON=python3.12 (or another python >= 3.11)" >&2; exit 2; }
}

setup() {  # $1: requirements file of the repository
  local req="$ROOT/$1" stamp want
  stamp="$VENV/.installed-$(basename "$1")"
  want="$(requirement_files "$req" | sort -u | contents_digest)"
  if [[ -x "$VENV/bin/python" ]] && ! python_ok "$VENV/bin/python"; then
    [[ -f "$VENV/pyvenv.cfg" ]] || { echo "local.sh: $VENV has $(python_version "$VENV/bin/python")," \
      "jax 0.10 needs Python >= 3.11, and it is not a venv this script may remove" >&2; exit 2; }
    check_python  # before the old venv goes
    echo "[setup] $VENV has $(python_version "$VENV/bin/python"), jax 0.10 needs >= 3.11: making it again"
    rm -rf "$VENV"
  fi
  if [[ ! -x "$VENV/bin/python" ]]; then
    check_python
    echo "[setup] creating $VENV with $(python_version "$PYTHON")"
    "$PYTHON" -m venv "$VENV"
  fi
  if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    echo "[setup] installing $req into $VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -r "$req"
    "$VENV/bin/python" -m pip install -q --no-deps -e "$ROOT"
    echo "$want" > "$stamp"
  fi
}

cmd="${1:-demo}"; shift || true
case "$cmd" in
  demo)
    setup requirements.txt
    exec "$VENV/bin/python" -m genmask_jax.demo "$@" ;;
  test)
    VENV="$TEST_VENV"
    setup requirements-test.txt
    cd "$ROOT"
    exec "$VENV/bin/python" -m pytest "$@" ;;
  python)
    setup requirements.txt
    exec "$VENV/bin/python" "$@" ;;
  *)
    echo "usage: bash launch/local.sh {demo|test|python} [args]" >&2; exit 2 ;;
esac
