#!/usr/bin/env bash
# What the lent GPU machine checks and measures, by part (one device call runs at most 10 minutes):
#   bash scripts/gpu_checks.sh "$OUT" tests replan quantize fp8     # then, in a second call:
#   bash scripts/gpu_checks.sh "$OUT" colocated
# with .whl carried (pydantic, rich, pytest and hypothesis wheels for the machine's Python). Writes under OUT:
#   tests.log      the GPU tests: Triton copies, checksums and the FP8 kernel compiled for the chip, CUDA syncs and IPC
#   replan.json    a new expert placement's rebind + first sync against a sync by an unchanged one
#   quantize.json  the FP8 quantizer's kernel variants on 8 GB against a flat copy and torch
#   address.json   what the per-sync check that 80,000 tensors have not moved costs, by way of checking
#   fp8.json       the FP8 refresh of the DeepSeek-V3-like case against its bf16 refresh, GB/s against a flat copy
#   kernel.json    the copy kernel's knobs on the MoE case's programs; syncs with the address check on and off, alternating
#   ipc.json       the CUDA IPC rows of colocated.json alone, with each process's waiting and copying
#   colocated.json every copy variant with and without the per-sync address check, CUDA IPC arena and direct
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: gpu_checks.sh OUT_DIR [tests] [replan] [quantize] [address] [fp8] [kernel] [ipc] [colocated]}
shift
parts=${*:-tests replan quantize address fp8 colocated}
python -m pip install -q --no-index --find-links .whl pydantic rich pytest hypothesis 2>&1 | tail -2
export PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# an array, not a function: timeout runs programs, not shell functions
bench=(python -c "import sys; from sync.bench.gpu import main; main(sys.argv[1:])")
for part in $parts; do
  case $part in
    tests) timeout 240 python -m pytest -q tests/unit/test_fp8_kernel.py tests/unit/test_triton_kernels.py tests/unit/test_checksums.py \
             tests/integration/test_gpu.py tests/integration/test_addresses.py > "$out/tests.log" 2>&1
           tail -5 "$out/tests.log" ;;
    replan) timeout 400 "${bench[@]}" --replan --profile --tile-kb 64 --moving-tile-kb 64 256 --out "$out/replan.json" > "$out/replan.log" 2>&1
            tail -c 1200 "$out/replan.log" ;;
    quantize) timeout 120 python -m sync.cli bench quantize -- --gb 8 --json "$out/quantize.json" > "$out/quantize.log" 2>&1
              tail -c 2500 "$out/quantize.log" ;;
    address) timeout 60 "${bench[@]}" --address-check 80000 --out "$out/address.json" > "$out/address.log" 2>&1
             tail -c 1500 "$out/address.log" ;;
    fp8) timeout 240 "${bench[@]}" --cases "dsv3-like fp8 tp2ep4->dp8ep8+32" "dsv3-like tp2ep4->dp8ep8+32" --reps 6 \
           --slices-reps 1 --out "$out/fp8.json" > "$out/fp8.log" 2>&1
         tail -c 2500 "$out/fp8.log" ;;
    kernel) timeout 540 "${bench[@]}" --kernel-sweep --reps 6 --out "$out/kernel.json" > "$out/kernel.log" 2>&1
            tail -c 3000 "$out/kernel.log" ;;
    ipc) timeout 300 "${bench[@]}" --cases --ipc --reps 10 --out "$out/ipc.json" > "$out/ipc.log" 2>&1
         tail -c 2500 "$out/ipc.log" ;;
    colocated) timeout 540 "${bench[@]}" --cases "dense 1.7B tp1->tp1" "dsv3-like tp2ep4->dp8ep8+32" --ipc --reps 6 \
                 --slices-reps 1 --out "$out/colocated.json" > "$out/colocated.log" 2>&1
               tail -c 2500 "$out/colocated.log" ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
  esac
done
