#!/usr/bin/env bash
# A second environment, .venv-vllm, with vLLM 0.33.0 (its CPU platform) for the tests that run rlsync
# against vLLM's real model classes, weight loaders, EPLB state and weight-transfer API (tests/vllm).
#
#   bash scripts/setup_vllm_tests.sh            # idempotent (about 1.5-3 min, 2.8 GB)
#   FORCE=1 bash scripts/setup_vllm_tests.sh    # wipe and rebuild
#   .venv-vllm/bin/python -m pytest tests/vllm
#
# vLLM's engine cannot run here (its CUDA kernels do not load); its model classes, loaders and
# configs do, on the CPU platform (VLLM_TARGET_DEVICE=cpu, set by tests/vllm/conftest.py).
#
# Rules followed:
#  * torch is pinned to 2.13.0 (the CPU build that lies in /opt/wheels); an
#    unpinned torch, or a dependency wanting torch==2.14.0 (vLLM's own pin),
#    could pull a multi-GB CUDA build. vllm itself and every requirement that
#    depends on torch are installed with --no-deps; everything else goes
#    through a constraints file that pins torch==2.13.0 so pip can never
#    upgrade it.
#  * CUDA/GPU-only requirements from vLLM's METADATA are skipped (list below).
#  * rlsync itself is installed editable with --no-deps (step 5).
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
VENV=$REPO/.venv-vllm
PY=${PYTHON:-python3}
STAMP=$VENV/.rlsync_vllm_ok

if [[ "${FORCE:-0}" == 1 ]]; then rm -rf "$VENV"; fi
if [[ -f "$STAMP" ]] && "$VENV/bin/python" -c 'import vllm, torch, planners, sync; assert vllm.__version__.startswith("0.33.0"), vllm.__version__; assert torch.__version__.startswith("2.13.0"), torch.__version__' 2>/dev/null; then
  # rlsync again (cheap): its vLLM plugin entry point must match this checkout's pyproject
  "$VENV/bin/python" -m pip --disable-pip-version-check install -q --no-deps -e "$REPO"
  echo "vLLM test environment ready at $VENV"; exit 0
fi

[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

CONS=$VENV/constraints.txt
cat > "$CONS" <<'EOF'
torch==2.13.0
EOF
# keep the machine-wide constraints (/etc/xdg/pip/constraints.txt) too; ours is
# added with -c, pip honours both.

# 1. torch CPU (local wheel in /opt/wheels via PIP_FIND_LINKS; seconds)
"${PIP[@]}" install -q -c "$CONS" "torch==2.13.0"

# 2. vLLM itself, no dependency resolution (its METADATA pins torch==2.14.0 and
#    many CUDA packages).
"${PIP[@]}" install -q --no-deps "vllm==0.33.0"

# 3. vLLM's pure-Python / CPU-capable requirements (from the wheel METADATA),
#    resolved normally but with torch pinned by the constraints file.
REQS=(
  regex cachetools psutil sentencepiece numpy "requests>=2.33.0"
  "certifi>=2026.10.19" tqdm blake3 py-cpuinfo
  "transformers>=5.16.1,<5.21.0" "huggingface_hub>=1.31.0" "tokenizers>=0.23.2"
  "safetensors>=0.6.2"
  "protobuf>=5.29.6,!=6.30.*,!=6.31.*,!=6.32.*,!=6.33.0.*,!=6.33.1.*,!=6.33.2.*,!=6.33.3.*,!=6.33.4.*"
  "fastapi[standard]>=0.133.0,<0.137.0" "starlette>=1.0.1" "aiohttp>=3.14.4"
  "multidict>=6.9.1" "openai>=2.25.0" "pydantic>=2.12.0" "orjson>=3.11.6"
  "prometheus_client>=0.18.0" "pillow>=13.0.0"
  "prometheus-fastapi-instrumentator>=8.0.0" "tiktoken>=0.6.0"
  "lm-format-enforcer==0.11.3" "llguidance>=1.7.0,<1.8.0"
  "outlines_core==0.2.14" "lark==1.2.2" "typing_extensions>=4.10"
  "filelock>=3.20.3" partial-json-parser "jsonschema>=4.23.0" "pyzmq>=25.0.0"
  msgspec "mistral_common[image]>=1.11.6" "opencv-python-headless>=4.13.0"
  pyyaml einops "depyf==0.20.0" cloudpickle watchfiles python-json-logger
  ninja pybase64 cbor2 ijson setproctitle "oss-harmony>=0.0.11"
  "anthropic>=0.71.0" "model-hosting-container-standards>=0.1.14,<1.0.0"
  "mcp>=2.2.0,<3.0.0" "opentelemetry-sdk>=1.27.0" "opentelemetry-api>=1.27.0"
  "opentelemetry-exporter-otlp>=1.27.0"
  "opentelemetry-semantic-conventions-ai>=0.4.1" "numba==0.65.0"
  # deps of the --no-deps packages of step 4 (xgrammar imports tvm_ffi at
  # import time; it is a CPU-capable C++ FFI wheel, no CUDA)
  "apache-tvm-ffi==0.1.11" loguru
  # extras for the tests of the weight-sync library
  scipy rich pytest hypothesis
)
"${PIP[@]}" install -q -c "$CONS" "${REQS[@]}"

# 4. requirements that declare a torch dependency: --no-deps so they cannot
#    touch torch (their other deps are covered above).
"${PIP[@]}" install -q --no-deps -c "$CONS" "compressed-tensors==0.17.0" "xgrammar==0.2.8"

# Skipped on purpose (CUDA/GPU-only, or not needed to import vLLM's model
# classes, config and weight loaders on CPU):
#   torch==2.14.0 (replaced by torch==2.13.0+cpu), torchaudio, torchvision,
#   torchcodec, PyNvVideoCodec, flashinfer-python, tilelang, triton (xgrammar dep),
#   nvidia-cudnn-frontend, nvtx, fastsafetensors, instanttensor,
#   nvidia-cutlass-dsl[cu13], quack-kernels, tokenspeed-mla,
#   humming-kernels[cu13]; all extras (zen, bench, tensorizer, runai, audio,
#   deepstream, b12x, helion, grpc, otel, extra-quant). No ray, xformers, cupy.

# 5. rlsync itself, editable, no deps (its own requirements are all above or already there).
"${PIP[@]}" install -q --no-deps -e "$REPO"

# 6. sanity: torch must still be the CPU 2.13.0 build.
VLLM_TARGET_DEVICE=cpu "$VENV/bin/python" - <<'EOF'
import torch, vllm, planners, sync
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert not torch.cuda.is_available()
from importlib.metadata import entry_points
assert any(e.value == "sync.ends.vllm_plugin:register" for e in entry_points(group="vllm.general_plugins"))
from vllm.platforms import current_platform
print("torch", torch.__version__, "vllm", vllm.__version__,
      "platform", type(current_platform).__name__)
EOF
touch "$STAMP"
echo "vLLM test environment ready at $VENV ($(du -sh "$VENV" | cut -f1))"
