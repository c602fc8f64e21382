"""Tests against vLLM's own code (its model classes, loaders, EPLB state, weight-transfer API) on vLLM's
CPU platform; ``scripts/setup_vllm_tests.sh`` makes the environment, ``.ci/run`` runs them. Every test
module here imports this first: vLLM picks its platform when it is first imported."""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
