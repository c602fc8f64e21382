"""Versioned refresh: an engine always knows whether it serves a complete, verified version.

``VersionedTarget`` wraps an engine target. A sync marks it *updating*; success (verified) makes the
new version the served one; a failure either leaves it marked as not serving a complete version
(in place: the tensors that were written are named) or, with ``staging=True``, keeps the old version
intact: bytes land in staging copies and are swapped in only after verification. Staging costs a
second copy of the engine's weights (``staging_bytes``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["VersionedTarget", "EngineState"]


@dataclass
class EngineState:
    serving: int | None = None  # the complete, verified version the engine serves (None: none)
    updating: int | None = None  # a sync in progress
    complete: bool = True  # False after a failed in-place sync: the weights are a mix of versions
    written: list[str] = field(default_factory=list)  # tensors a failed in-place sync may have touched
    error: str | None = None


class VersionedTarget:
    def __init__(self, inner, staging: bool = False, max_staging_bytes: float | None = None) -> None:
        """``max_staging_bytes``: refuse (before any byte moves) to stage more than this."""
        self.inner, self.staging = inner, staging
        self.state = EngineState()
        self._stage: dict[str, torch.Tensor] | None = None
        if staging and max_staging_bytes is not None and self.staging_bytes > max_staging_bytes:
            raise ValueError(f"staging this engine rank's weights needs {self.staging_bytes / 2**20:.1f} MB but "
                             f"sync.staging_buckets x sync.bucket_mb allows {max_staging_bytes / 2**20:.1f} MB: "
                             f"raise it, or set sync.staging: false to update in place (a failed sync is then "
                             f"reported, not undone)")

    @classmethod
    def for_job(cls, inner, sync) -> "VersionedTarget":
        """As the job's ``sync`` settings say (``staging``, ``staging_buckets`` of ``bucket_mb``)."""
        cap = None if sync.staging_buckets is None else sync.staging_buckets * sync.bucket_mb * 2**20
        return cls(inner, sync.staging, cap)

    @property
    def staging_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.inner.local_tensors().values()) if self.staging else 0

    def local_tensors(self) -> dict[str, torch.Tensor]:
        return self._stage if self._stage is not None else self.inner.local_tensors()

    def begin(self, version: int) -> None:
        self.state.updating, self.state.error = version, None
        if self.staging:
            # a copy, not empty buffers: bytes no sync writes (vocabulary padding) must stay as they are
            self._stage = {k: v.clone() for k, v in self.inner.local_tensors().items()}
        else:
            self.state.complete = False  # from the first byte on, the live weights are in flux

    def commit(self, version: int) -> None:
        if self._stage is not None:
            for k, v in self.inner.local_tensors().items():
                v.copy_(self._stage[k])
            self._stage = None
        self.state = EngineState(serving=version)

    def abort(self, error: str, written: list[str]) -> None:
        self.state.updating, self.state.error = None, error
        if self._stage is not None:  # the served version was never touched
            self._stage = None
            return
        self.state.serving, self.state.complete, self.state.written = None, False, written

    def set_placement(self, placement) -> None:
        if hasattr(self.inner, "set_placement"):
            self.inner.set_placement(placement)
