#!/usr/bin/env bash
# Installs a built pid_fast wheel into a FRESH venv with the given torch and runs the op tests
# there: from a copy of tests/ops (+ tests/conftest.py, pyproject.toml's pytest settings) in a
# scratch folder, so the installed pid_fast is imported, never the source tree's. Then checks
# the installed library's symbols (build_support/check_stable_symbols.py).
#
# Usage: build_support/wheel_check.sh WHEEL TORCH_SPEC...
#   e.g. build_support/wheel_check.sh dist/pid_fast-0.1.0-cp310-abi3-linux_x86_64.whl torch==2.14.1
# Environment: PYTHON (default python3) makes the venv; KEEP=1 keeps the scratch folder.
set -euo pipefail
[ $# -ge 2 ] || { sed -n 2,10p "$0"; exit 2; }
wheel=$(realpath "$1"); shift
src=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/pid_fast-wheel-check.XXXXXX")
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$work"' EXIT

"${PYTHON:-python3}" -m venv "$work/venv"
py="$work/venv/bin/python"
# --no-compile: no .pyc for torch's thousands of files (the tests compile what they import).
"$py" -m pip install -q --no-compile "$@" pytest hypothesis
"$py" -m pip install -q --no-compile "$wheel"  # its torch requirement is met by the torch above

mkdir "$work/tests"
cp -r "$src/tests/conftest.py" "$src/tests/ops" "$work/tests/"
cp "$src/pyproject.toml" "$work/"
cd "$work"
"$py" - "$work/venv" <<'PY'
import importlib.util, json, sys, torch
import pid_fast
lib = importlib.util.find_spec("pid_fast._C").origin
assert pid_fast.__file__.startswith(sys.argv[1]), f"pid_fast imported from {pid_fast.__file__}"
print(f"torch {torch.__version__}, pid_fast from {lib}")
print("build_info:", json.dumps(pid_fast.build_info()))
PY
"$py" "$src/build_support/check_stable_symbols.py" "$("$py" -c \
    'import importlib.util; print(importlib.util.find_spec("pid_fast._C").origin)')"
OMP_NUM_THREADS=1 "$py" -m pytest tests/ops -q -p no:cacheprovider
