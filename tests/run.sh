#!/usr/bin/env bash
# The test command (the README's): bootstrap whatever is missing, then pytest.
#
#   bash tests/run.sh [pytest args...]
#
# Idempotent: a second run installs nothing new and only re-runs the tests.
# Steps: system packages (etcd for the baseline's tests, iproute2 for the
# network-namespace testbed) only when missing; .venv with python3 if missing;
# torch pinned first (see below); the package with its dev/etcd/bench/scenario extras;
# pytest.  "No tests collected" (pytest exit 5) counts as a failure: a test
# command that silently runs nothing is how suites rot.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# 1. System packages, only if missing and only where we may install them.
missing=()
command -v etcd >/dev/null 2>&1 || [ -x /usr/bin/etcd ] || missing+=(etcd-server)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
if [ ${#missing[@]} -gt 0 ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "run.sh: installing ${missing[*]}" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        echo "run.sh: installing ${missing[*]} (sudo)" >&2
        sudo -n apt-get update -qq
        sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "run.sh: missing ${missing[*]} and cannot install them here (need root and apt-get);" \
             "tests that need them skip (or fail under CI=true)" >&2
    fi
fi

# 2. The virtual environment.
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "run.sh: creating .venv with $PYTHON" >&2
    "$PYTHON" -m venv .venv
fi
VPY=.venv/bin/python

# 3. torch first, pinned: the package's range (torch>=2.4) would let pip pick
#    the newest torch, on Linux a multi-GB CUDA build; the pinned CPU wheel is
#    what this project is measured with.  Skipped when already installed.
TORCH_SPEC=${CHAOS_TORCH_SPEC:-torch==2.13.0}
if ! "$VPY" - "$TORCH_SPEC" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
want = sys.argv[1].partition("==")[2]
sys.exit(0 if want and version("torch").split("+")[0] == want else 1)
PY
then
    echo "run.sh: installing $TORCH_SPEC" >&2
    "$VPY" -m pip install -q "$TORCH_SPEC"
fi

# 4. The package itself (editable) with the extras the tests use.
"$VPY" -m pip install -q -e '.[dev,etcd,bench,scenario]'

# 5. The tests.
rc=0
"$VPY" -m pytest -q "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
    echo "run.sh: FAILED: pytest collected no tests (exit 5); check the path/-k filter" >&2
    exit 1
fi
exit "$rc"
