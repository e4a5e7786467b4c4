#!/usr/bin/env bash
# One entry point for a fresh machine.
#   bash run.sh demo [extra args]   set up, then the per-epoch extremes demo (CIFAR-10 if found)
#   bash run.sh test [pytest args]  set up, then the test suite
#   bash run.sh setup               only create .venv with the pinned dependencies
# Set up means: a virtual environment in .venv with torch==2.14.1, torchvision==0.29.1
# and curvlab installed in editable mode (skipped when already done).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=.venv

setup() {
    if [ ! -x "$VENV/bin/python" ]; then
        "$PY" -m venv "$VENV"
    fi
    if ! "$VENV/bin/python" -c "import torch, torchvision, einops, numpy, tqdm, pytest, matplotlib, curvlab" 2>/dev/null \
        || [ pyproject.toml -nt "$VENV/.curvlab-installed" ]; then
        "$VENV/bin/python" -m pip install --quiet torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "^WARNING: Location" || true
        "$VENV/bin/python" -m pip install --quiet -e ".[test,plot]" 2>&1 | grep -v "^WARNING: Location" || true
        "$VENV/bin/python" -c "import torch, curvlab; print('curvlab', curvlab.__version__, 'torch', torch.__version__)"
        touch "$VENV/.curvlab-installed"
    fi
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    setup) setup ;;
    test) setup; exec "$VENV/bin/python" -m pytest -q "$@" ;;
    demo) setup; exec "$VENV/bin/python" -m experiments.train_cifar --demo "$@" ;;
    *) echo "usage: bash run.sh demo|test|setup [args...]" >&2; exit 2 ;;
esac
