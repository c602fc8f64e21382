"""Reload mode: a sync lands in the loaded layout, then vLLM's own post-load processing re-lays it.

Where vLLM's ``process_weights_after_loading`` is not the identity (see ``sync.ends.vllm_processing``),
the tensors its kernels read are not the ones a sync can address. :class:`ReloadTarget` then uses vLLM's
layerwise reload (``vllm.model_executor.model_loader.reload``), the machinery vLLM's own weight-transfer
backends use for checkpoint-format updates:

* ``begin``: ``initialize_layerwise_reload(model)`` keeps every layer's kernel tensors aside and puts the
  layers back in their loaded layout on the meta device; the layers the plan writes are materialized
  (zeroed: vocabulary padding no sync writes stays zero, as vLLM's loaders leave it) and become the
  sync's target. Kernel tensors are not touched: the engine's served version is intact until commit.
* ``commit`` (after verification): each written layer gets vLLM's processing (its quant method's
  ``process_weights_after_loading``, the results copied into the kernel tensors' storage, which CUDA
  graphs captured), then ``finalize_layerwise_reload`` puts the other layers' kernel tensors back and
  re-runs the attention layers' processing (MLA derives its absorbed weights from ``kv_b_proj`` there).
* ``abort``: ``finalize_layerwise_reload`` alone: every layer gets its old kernel tensors back, so a
  failed sync leaves the previous version serving, and says so.

"Verified" in this mode means the loaded-layout bytes are the trainer's, and the kernel tensors are
vLLM's processing of exactly those bytes.
"""

from __future__ import annotations

import torch

from planners.errors import RLSyncError
from planners.plan import SyncPlan
from sync.ends.base import check_locals, end_locals
from sync.ends.versioned import EngineState
from sync.ends.vllm_experts import EngineConfigError, ExpertMaps
from sync.ends.vllm_processing import TensorFacts, own_tensors, record_of
from sync.tensors import TORCH_DTYPES

__all__ = ["ReloadTarget", "ReloadError", "reload_available"]


def reload_available() -> bool:
    try:
        from vllm.model_executor.model_loader.reload import layerwise  # noqa: F401
    except ImportError:
        return False
    return all(hasattr(layerwise, f) for f in ("initialize_layerwise_reload", "finalize_layerwise_reload",
                                                "get_layerwise_info", "_copy_and_restore_kernel_tensors"))


def _loaded_layout(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the model as vLLM loads it (before processing), by full name: the meta tensors
    vLLM recorded when it built the model, or the live tensor where it recorded none (biases and
    other tensors reload never moves to meta)."""
    from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        params, buffers = get_layerwise_info(module).restore_metadata
        for leaf, t in {**own_tensors(module), **buffers, **params}.items():
            if t is not None:
                out[prefix + leaf] = t
    return out


class ReloadTarget:
    """One engine rank's weights in reload mode (versioned: ``begin``/``commit``/``abort``, ``state``)."""

    def __init__(self, plan: SyncPlan, rank: int, model: torch.nn.Module, model_config, find_holder) -> None:
        from sync.ends.vllm import map_parameter_names

        if not reload_available():
            raise EngineConfigError("this vLLM has no layerwise reload (vllm.model_executor.model_loader.reload): "
                                    "the engine's post-load processing is not the identity, so a sync cannot write "
                                    "the tensors its kernels read; use vLLM 0.12 or later")
        self.plan, self.rank, self.model, self.model_config = plan, rank, model, model_config
        layout = _loaded_layout(model)
        wanted = [plan.local_name[i] for i in end_locals(plan, rank)]
        self.names = map_parameter_names(wanted, [n for n in layout if not n.endswith(("_expert_map", "expert_mask"))])
        # before any byte moves: the plan's shapes and dtypes are the loaded layout's
        self._layout = {ours: layout[theirs] for ours, theirs in self.names.items()}
        check_locals(plan, rank, self._layout, "target")
        self._index = {plan.local_name[i]: int(i) for i in end_locals(plan, rank)}
        self.modules = {}  # plan name -> (module name, leaf)
        for ours, theirs in self.names.items():
            module, _, leaf = theirs.rpartition(".")
            self.modules[ours] = (module, leaf)
        deferred = sorted({m for m, _ in self.modules.values() if _is_deferred_attention(model.get_submodule(m))})
        if deferred:
            raise EngineConfigError(f"plan tensors live in attention layers vLLM processes last ({deferred[:3]}); "
                                    "reload mode does not write those")
        self.aliases = _aliases(model, self.modules)  # plan name -> [(module, leaf)] sharing it
        self.experts = ExpertMaps(plan, rank, find_holder)
        if plan.placement is not None:
            self.experts.check(plan.placement_of(rank))
        self.state = EngineState()
        self._tensors: dict[str, torch.Tensor] | None = None
        self._live: dict[str, torch.Tensor] = {}  # staged copies of tensors reload keeps live (not on meta)

    # -- the sync target -------------------------------------------------------------------------
    def local_tensors(self) -> dict[str, torch.Tensor]:
        """During a sync (between begin and commit or abort): the materialized loaded-layout tensors the
        bytes land in. Outside one: the loaded layout itself (meta tensors: shapes and dtypes to check)."""
        return self._layout if self._tensors is None else self._tensors

    def check_placement(self, placement) -> None:
        self.experts.check(placement)

    def begin(self, version: int) -> None:
        from vllm.model_executor.model_loader.reload.layerwise import (get_layerwise_info,
                                                                        initialize_layerwise_reload)
        from vllm.model_executor.model_loader.reload.meta import materialize_layer

        self.state.updating, self.state.error = version, None
        initialize_layerwise_reload(self.model)
        tensors, self._live = {}, {}
        with torch.no_grad():
            for module_name in self._written_layers():
                module = self.model.get_submodule(module_name)
                materialize_layer(module, get_layerwise_info(module))
            for ours, (module_name, leaf) in self.modules.items():
                t = getattr(self.model.get_submodule(module_name), leaf)
                if self._is_staged_by_reload(module_name, leaf):
                    t.data.zero_()
                    tensors[ours] = t.data
                else:  # reload leaves it live: stage a copy in the plan's dtype, written at commit
                    i = self._index[ours]
                    copy = torch.empty(tuple(self.plan.local_shape[i]), dtype=TORCH_DTYPES[self.plan.local_dtype[i]],
                                       device=t.device)
                    copy.copy_(t.data.reshape(copy.shape)) if t.numel() == copy.numel() else copy.zero_()
                    self._live[ours] = copy
                    tensors[ours] = copy
        self._tensors = tensors

    def _written_layers(self) -> list[str]:
        """The layers a sync rewrites: those the plan writes, and those sharing a tensor with one (a tied
        ``lm_head``): vLLM loads the shared tensor once, but each layer's processing derives its own copy
        (the CPU platform packs ``lm_head`` for its matmul), so each must be processed again."""
        written = {m for m, _ in self.modules.values()}
        written.update(m for shared in self.aliases.values() for m, _ in shared)
        return sorted(written)

    def _is_staged_by_reload(self, module_name: str, leaf: str) -> bool:
        from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

        params, buffers = get_layerwise_info(self.model.get_submodule(module_name)).restore_metadata
        return leaf in params or leaf in buffers

    def commit(self, version: int) -> None:
        """vLLM's processing of the verified bytes, checked, then copied into the kernel tensors. Until the
        copy nothing the kernels read has changed: a processing that fails or that does not reproduce
        what vLLM's load did leaves the engine serving its previous version, and raises."""
        from vllm.model_executor.model_loader.reload.layerwise import (_copy_and_restore_kernel_tensors,
                                                                        finalize_layerwise_reload, get_layerwise_info)

        layers = {m: self.model.get_submodule(m) for m in self._written_layers()}
        backups = []  # tensors reload keeps live are kernel tensors: their old values, until the checks pass
        # processing also sets plain attributes the kernels call (the CPU platform's ``cpu_linear``, a
        # matmul handle holding its own copy of the new weights): the old ones, until the checks pass
        attributes = {m: _attributes(layer) for m, layer in layers.items()}
        try:
            with torch.no_grad():
                for ours, copy in self._live.items():
                    module_name, leaf = self.modules[ours]
                    live = getattr(self.model.get_submodule(module_name), leaf)
                    backups.append((live, live.data.clone()))
                    live.data.copy_(copy.reshape(live.shape))
                for ours, shared in self.aliases.items():  # tied layers: the same bytes, processed their own way
                    for module_name, leaf in shared:
                        alias = getattr(self.model.get_submodule(module_name), leaf)
                        alias.data.copy_(self._tensors[ours].reshape(alias.shape))
                written = {m: _facts(layer) for m, layer in layers.items()}
                for layer in layers.values():
                    _process(layer)
                self._check_reproduces_load(layers, written)
        except BaseException as e:
            with torch.no_grad():
                for live, old in backups:
                    live.data.copy_(old)
            for module_name, layer in layers.items():
                _put_back_attributes(layer, attributes[module_name])
            self.abort(f"vLLM's processing of version {version}: {e}", [])
            raise
        with torch.no_grad():
            for layer in layers.values():
                info = get_layerwise_info(layer)
                _copy_and_restore_kernel_tensors(layer, info)
                info.reset()
            finalize_layerwise_reload(self.model, self.model_config)  # the other layers; attention processed last
        self._tensors, self._live = None, {}
        self.state = EngineState(serving=version)

    def _check_reproduces_load(self, layers: dict[str, torch.nn.Module], written: dict[str, dict]) -> None:
        """Where vLLM's load re-laid a layer's tensors, its processing now must re-lay the new bytes too,
        into the kernel tensors' shapes: a processing that runs differently on an update than on the first
        load (vLLM 0.33's CPU MoE skips its prepack then) would hand the kernels an unprocessed layout."""
        from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

        record = record_of(self.model)
        for name, layer in layers.items():
            kernel_params, kernel_buffers = get_layerwise_info(layer).kernel_tensors or ({}, {})
            for leaf, kernel in {**kernel_buffers, **kernel_params}.items():
                now = getattr(layer, leaf, None)
                if now is not None and tuple(now.shape) != tuple(kernel.shape):
                    raise ReloadError(f"vLLM's processing of {name}.{leaf} gave shape {tuple(now.shape)}, its kernel "
                                      f"tensor is {tuple(kernel.shape)}: vLLM's reload does not reproduce its load here")
            if record is not None and name in record.relaid and written[name] == _facts(layer):
                raise ReloadError(f"vLLM re-laid {name} when it loaded the model ({record.changed[name]}) but its "
                                  "processing of an update left the new bytes as written: the kernels would read an "
                                  "unprocessed layout (vLLM's weight-update path differs from its load path here)")

    def abort(self, error: str, written: list[str]) -> None:
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        with torch.no_grad():
            finalize_layerwise_reload(self.model, self.model_config)  # every layer's old kernel tensors back
        self._tensors, self._live = None, {}
        self.state.updating, self.state.error = None, error  # still serving the version it served

    def set_placement(self, placement) -> None:
        self.experts.install(placement)


def _aliases(model: torch.nn.Module, modules: dict[str, tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """For each plan tensor, the tensors of other layers that are the same tensor (tied word embeddings:
    ``lm_head.weight`` is ``embed_tokens.weight``), by (module, leaf). Such a layer is reloaded with the
    plan tensor's bytes; one that holds anything else the plan does not write cannot be, and is refused.
    Tensors reload keeps live (a router's correction bias the experts also hold) are not staged: written
    where they are, every holder sees them, and nothing is reloaded for them."""
    from vllm.model_executor.model_loader.reload.meta import SKIP_TENSORS

    def key(t: torch.Tensor):
        return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))

    written = {(m, leaf) for m, leaf in modules.values()}
    holders: dict[tuple, list[tuple[str, str]]] = {}
    for name, module in model.named_modules():
        for leaf, t in own_tensors(module).items():
            if not t.is_meta and t.numel() and leaf not in SKIP_TENSORS:
                holders.setdefault(key(t), []).append((name, leaf))
    out: dict[str, list[tuple[str, str]]] = {}
    for ours, (module_name, leaf) in modules.items():
        kernel = getattr(model.get_submodule(module_name), leaf)
        if leaf in SKIP_TENSORS or kernel is None or kernel.is_meta or not kernel.numel():
            continue
        shared = [h for h in holders.get(key(kernel), []) if h not in written and h[0] != module_name]
        for other, other_leaf in shared:
            module = model.get_submodule(other)
            rest = [n for n in own_tensors(module) if n != other_leaf and n not in SKIP_TENSORS]
            if rest:
                raise EngineConfigError(f"{other}.{other_leaf} is the same tensor as {module_name}.{leaf}, which the plan "
                                        f"writes, but {other} also holds {rest}, which it does not: reload cannot "
                                        "re-process that layer")
        if shared:
            out[ours] = shared
    return out


class ReloadError(RLSyncError, RuntimeError):
    """vLLM's processing of an update did not give what its load gave; the engine keeps its old version."""


def _attributes(layer: torch.nn.Module) -> dict:
    """A layer's own attributes but its tensors and submodules (which reload keeps and puts back)."""
    return {k: v for k, v in vars(layer).items() if k not in ("_parameters", "_buffers", "_modules")}


def _put_back_attributes(layer: torch.nn.Module, saved: dict) -> None:
    for key in [k for k in vars(layer) if k not in saved and k not in ("_parameters", "_buffers", "_modules")]:
        delattr(layer, key)
    vars(layer).update(saved)


def _facts(layer: torch.nn.Module) -> dict:
    return {leaf: TensorFacts.of(t) for leaf, t in own_tensors(layer).items()}


def _process(layer: torch.nn.Module) -> None:
    """vLLM's post-load processing of one layer (its quant method's), as its loader runs it."""
    from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase

    if hasattr(layer, "_already_called_process_weights_after_loading"):  # online quantization runs once per load
        delattr(layer, "_already_called_process_weights_after_loading")
    quant_method = getattr(layer, "quant_method", None)
    if isinstance(quant_method, QuantizeMethodBase):
        quant_method.process_weights_after_loading(layer)
        if hasattr(layer, "update_param_tp_status"):
            layer.update_param_tp_status()


def _is_deferred_attention(module: torch.nn.Module) -> bool:
    try:
        from vllm.model_executor.layers.attention import is_deferred_attention_layer
    except ImportError:
        return False
    return bool(is_deferred_attention_layer(module))
