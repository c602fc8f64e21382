"""rlsync's vLLM plugin: registers the ``rlsync`` weight-transfer backend and watches vLLM load the model.

vLLM runs every ``vllm.general_plugins`` entry point in each of its processes before it builds a model
(``pyproject.toml`` declares ours: ``rlsync = "sync.ends.vllm_plugin:register"``; ``VLLM_PLUGINS`` can
restrict which run). :func:`register` is safe to call any number of times and does three things:

1. registers :class:`sync.ends.vllm_backend.RLSyncTransferEngine` with vLLM's
   ``WeightTransferEngineFactory`` as ``"rlsync"`` (lazily: the backend module loads when an engine
   asks for it), so ``LLM(..., weight_transfer_config=WeightTransferConfig(backend="rlsync"))`` works;
2. wraps vLLM's ``process_weights_after_loading`` so every model it loads gets a
   :class:`~sync.ends.vllm_processing.ProcessingRecord`: which modules that processing left exactly as
   loaded (the engine end writes those in place) and which it re-laid (those get vLLM's layerwise reload);
3. wraps ``EplbState.add_model`` so the engine end can find the EPLB state of its model (the backend
   is handed the model, not the model runner that owns the state).

Without the plugin the backend cannot prove any module's processing is the identity: it reloads.
"""

from __future__ import annotations

import functools
from weakref import WeakSet

from sync.ends.vllm_processing import RECORDS, compare, snapshot

__all__ = ["register", "EPLB_STATES", "BACKEND_NAME"]

BACKEND_NAME = "rlsync"

# every EplbState vLLM filled in this process (weak: vLLM owns them)
EPLB_STATES: WeakSet = WeakSet()


def register() -> None:
    _register_backend()
    _watch_processing()
    _watch_eplb()


def _register_backend() -> None:
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    if BACKEND_NAME not in WeightTransferEngineFactory._registry:  # it refuses a second registration
        WeightTransferEngineFactory.register_engine(BACKEND_NAME, "sync.ends.vllm_backend", "RLSyncTransferEngine")


def _watch_processing() -> None:
    from vllm.model_executor.model_loader import base_loader, utils

    for module in (base_loader, utils):  # base_loader calls the name it imported from utils
        original = module.process_weights_after_loading
        if getattr(original, "_rlsync_watched", False):
            continue

        @functools.wraps(original)
        def watched(model, model_config, target_device, _original=original):
            before = snapshot(model)
            _original(model, model_config, target_device)
            RECORDS[model] = compare(before, snapshot(model))

        watched._rlsync_watched = True
        module.process_weights_after_loading = watched


def _watch_eplb() -> None:
    try:
        from vllm.distributed.eplb.eplb_state import EplbState
    except ImportError:  # a vLLM without EPLB
        return
    original = EplbState.add_model
    if getattr(original, "_rlsync_watched", False):
        return

    @functools.wraps(original)
    def watched(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        EPLB_STATES.add(self)
        return out

    watched._rlsync_watched = True
    EplbState.add_model = watched
