"""Tests against vLLM's own code: its model classes, weight loaders, EPLB state and weight-transfer API,
on vLLM's CPU platform (``scripts/setup_vllm_tests.sh`` makes the environment; ``.ci/run`` runs them)."""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
