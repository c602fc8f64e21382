"""The rlsync vLLM plugin as vLLM finds it: an installed entry point that vLLM's own plugin loader runs,
safe to run again, registering the backend vLLM's factory hands out."""

from __future__ import annotations

import vllm_cpu  # noqa: F401  (first: vLLM's platform)

from importlib.metadata import entry_points


def test_vllm_finds_the_plugin_and_the_factory_hands_out_the_backend():
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
    from vllm.plugins import load_plugins_by_group

    plugins = load_plugins_by_group("vllm.general_plugins")
    assert "rlsync" in plugins
    assert any(e.value == "sync.ends.vllm_plugin:register" for e in entry_points(group="vllm.general_plugins"))
    plugins["rlsync"]()
    plugins["rlsync"]()  # vLLM may run plugins more than once per process
    from sync.ends.vllm_backend import RLSyncTransferEngine
    from vllm.distributed.weight_transfer.base import WeightTransferEngine

    engine_cls = WeightTransferEngineFactory._registry["rlsync"]()
    assert engine_cls is RLSyncTransferEngine and issubclass(engine_cls, WeightTransferEngine)

    from vllm.model_executor.model_loader import base_loader, utils

    assert base_loader.process_weights_after_loading._rlsync_watched
    assert utils.process_weights_after_loading._rlsync_watched
    assert not hasattr(base_loader.process_weights_after_loading.__wrapped__, "_rlsync_watched")  # wrapped once
