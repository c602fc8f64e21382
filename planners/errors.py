"""Every error rlsync raises for input it cannot use or a sync that did not complete.

They share one base, :class:`RLSyncError`, so a caller can catch all of them at once; each message
names the field (as the job spec or config writes it) and what would be valid. Errors about input
are also ``ValueError`` s; errors of a running sync (``sync.executor.SyncError``) are also
``RuntimeError`` s.
"""

from __future__ import annotations

__all__ = ["RLSyncError", "JobError", "ModelError", "LayoutError", "ShardError", "PlacementError", "EplbError",
           "PlanError", "PlanBuildError", "SyncError", "SyncTimeout", "VerificationError"]


class RLSyncError(Exception):
    """Base of every rlsync error."""


class JobError(RLSyncError, ValueError):
    """A job spec that cannot run; the message names the field and what would be valid."""


class ModelError(RLSyncError, ValueError):
    """A model config the planner cannot use; the message names the key."""


class LayoutError(RLSyncError, ValueError):
    """A layout that cannot exist; the message names the field and what would be valid."""


class ShardError(RLSyncError, ValueError):
    """A layout that the model's shapes do not divide; the message names the fields."""


class PlacementError(RLSyncError, ValueError):
    """An expert placement that does not fit the model or the engine."""


class EplbError(RLSyncError, ValueError):
    """Arguments a placement cannot be computed for; the message names the argument."""


class PlanError(RLSyncError, ValueError):
    """A plan that does not do what a plan must; the message says which chunk or piece."""


class PlanBuildError(RLSyncError, ValueError):
    """The two sides do not fit together (an inference byte no trainer rank holds)."""


class SyncError(RLSyncError, RuntimeError):
    """A sync that did not complete; the message names stage, peer and bucket."""


class SyncTimeout(SyncError):
    """A peer that did not answer within the sync's deadline."""


class VerificationError(SyncError):
    """Engine tensors that differ from what the trainer sent (``strict`` syncs raise it on every rank)."""
