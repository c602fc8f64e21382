#!/usr/bin/env bash
# Everything the lent GPU machine checks and measures, in one call (device time is scarce):
#   pydantic/rich/pytest/hypothesis wheels for its Python travel in .whl (carry it), then
#   bash scripts/gpu_checks.sh "$OUT"
# writes under OUT: tests.log (the GPU tests: Triton copies, CUDA syncs and IPC, the FP8 kernel compiled),
# replan.json (issue 16: a new placement's rebind + first sync against an unchanged sync),
# fp8.json (issue 17: the FP8 refresh against the bf16 one, payload GB/s against the flat copy),
# colocated.json (issue 18: every variant with and without the per-sync address check, IPC arena and direct).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: gpu_checks.sh OUT_DIR}
python -m pip install -q --no-index --find-links .whl pydantic rich pytest hypothesis 2>&1 | tail -2
export PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
bench() { python -c "import sys; from sync.bench.gpu import main; main(sys.argv[1:])" "$@"; }
timeout 240 python -m pytest -q tests/unit/test_fp8_kernel.py tests/integration/test_gpu.py > "$out/tests.log" 2>&1
tail -3 "$out/tests.log"
timeout 300 bench --replan --profile --out "$out/replan.json" > "$out/replan.log" 2>&1; tail -c 1500 "$out/replan.log"
timeout 420 bench --cases "dsv3-like fp8 tp2ep4->dp8ep8+32" "dsv3-like tp2ep4->dp8ep8+32" --reps 6 --slices-reps 1 \
  --out "$out/fp8.json" > "$out/fp8.log" 2>&1; tail -c 2500 "$out/fp8.log"
timeout 420 bench --cases "dense 1.7B tp1->tp1" --ipc --reps 6 --slices-reps 1 --out "$out/colocated.json" \
  > "$out/colocated.log" 2>&1; tail -c 2000 "$out/colocated.log"
