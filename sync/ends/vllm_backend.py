"""The ``rlsync`` backend of vLLM's weight-transfer API (needs vLLM with ``vllm.distributed.weight_transfer``).

Start each engine with the backend (the rlsync plugin registered it in every vLLM process)::

    LLM(model=..., weight_transfer_config=WeightTransferConfig(backend="rlsync"), ...)  # settings: sync.ends.vllm

and drive it with vLLM's own calls (``LLM`` methods, the HTTP routes, or ``collective_rpc``), on every
worker of every engine, while the trainer ranks run the same plan's sync (``sync.session``):

* ``init_weight_transfer_engine({"plan": plan.to_dict(), "engine_index": i, "host": ..., "port": ...,
  "backend": "nccl", "ipc": False, "mode": "auto"})`` -- joins the sync group as the plan rank of vLLM's
  (engine, DP, PP, TP) coordinates, checks the engine's settings against the plan and binds the rank's
  tensors: in place where vLLM's post-load processing was the identity, else vLLM's layerwise reload
  (``sync.ends.vllm_engine``; ``mode`` "in_place" or "reload" to insist);
* ``start_weight_update()``, ``update_weights({"version": v, "plan": None or a new plan's dict})`` -- one
  versioned sync of the whole plan (a new plan, e.g. a new expert placement, is checked before any byte
  moves), verified; ``finish_weight_update()`` -- installs the placement matching the committed weights and
  resets the engine's expert loads.

What the last sync did (mode, verified, served version) is ``engine.report()``; the expert load since
then ``engine.expert_load()`` (``[moe layers of the stage, experts]``, summed over the engine's EP ranks);
``collective_rpc`` reaches both through the worker's ``weight_transfer_engine``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.weight_transfer.base import (WeightTransferEngine, WeightTransferInitInfo,
                                                   WeightTransferUpdateInfo)

from planners.plan import SyncPlan
from sync.ends.vllm_engine import EngineEnd, join

__all__ = ["RLSyncTransferEngine", "RLSyncInitInfo", "RLSyncUpdateInfo"]


@dataclass
class RLSyncInitInfo(WeightTransferInitInfo):
    plan: dict[str, Any]
    engine_index: int
    host: str
    port: int
    backend: str = "nccl"
    ipc: bool | str = False
    mode: str = "auto"


@dataclass
class RLSyncUpdateInfo(WeightTransferUpdateInfo):
    version: int | None = None  # by default one more than the last
    plan: dict[str, Any] | None = None  # a new plan for this and later syncs (same group)


class RLSyncTransferEngine(WeightTransferEngine[RLSyncInitInfo, RLSyncUpdateInfo]):
    init_info_cls = RLSyncInitInfo
    update_info_cls = RLSyncUpdateInfo
    supports_draft_weight_update = False  # the plan is the main model's

    end: EngineEnd | None = None

    def init_transfer_engine(self, init_info: RLSyncInitInfo) -> None:
        self.end = join(SyncPlan.from_dict(init_info.plan), init_info.engine_index, init_info.host, init_info.port,
                        self.vllm_config, self.model, None, init_info.backend, init_info.ipc, init_info.mode)

    def start_weight_update(self) -> None:
        self._joined().start()

    def receive_weights(self, update_info: RLSyncUpdateInfo) -> None:
        plan = None if update_info.plan is None else SyncPlan.from_dict(update_info.plan)
        self._joined().receive(update_info.version, plan)

    def finish_weight_update(self) -> None:
        self._joined().finish()

    def shutdown(self) -> None:
        self.end = None  # the sync group's store and process group go with the session

    # -- beyond vLLM's interface -----------------------------------------------------------------
    def report(self) -> dict[str, Any] | None:
        end = self._joined()
        return None if end.report is None else end.report.as_dict()

    def expert_load(self) -> dict[str, Any]:
        end = self._joined()
        return {"rows": list(end.target.experts.moe_rows), "load": end.expert_load().tolist()}

    @property
    def mode(self) -> str:
        return self._joined().mode

    def _joined(self) -> EngineEnd:
        if self.end is None:
            raise RuntimeError("the rlsync backend has not joined a sync: call init_weight_transfer_engine first")
        return self.end
