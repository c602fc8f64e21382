#!/usr/bin/env bash
# Create .venv with everything rlsync needs. torch is pinned to the CPU build that this machine
# kind keeps on local disk (an unpinned torch would download a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}" 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -m pip install -q -e '.[test]' 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c "import torch, numpy, numba, scipy, matplotlib, megatron.core, ray, yaml, rich, pydantic, hypothesis, importlinter, planners, sync" 2>/dev/null \
  || { echo "setup failed: a dependency did not install" >&2; exit 1; }
