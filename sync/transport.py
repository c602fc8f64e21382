"""The sync's own process group, apart from the default one.

Trainer processes give their default group to Megatron and engine processes theirs to vLLM, so
the sync cannot use ``torch.distributed``'s default group: it builds a *standalone* group over its
own TCP store spanning every trainer and engine rank (gloo on CPU, NCCL on GPU) and talks through
the group object directly. :class:`Transport` wraps either that or a registered group behind the
few operations the executors use, with global ranks of the sync job.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["Transport", "SoloTransport", "standalone_transport"]

class Transport:
    """Ranks are global sync ranks. ``Transport()`` uses the default group (whose ranks are the sync's);
    ``Transport(group, rank, size, store)`` a standalone group object; ``ranks`` lists the global rank
    of each member when the group is a subgroup."""

    def __init__(self, group=None, rank: int | None = None, size: int | None = None, store=None,
                 timeout_s: float = 120.0, ranks: list[int] | None = None) -> None:
        self.group = group
        self.standalone = rank is not None  # a group object torch.distributed does not know
        self.size = size if self.standalone else (len(ranks) if ranks else dist.get_world_size())
        self.ranks = ranks or list(range(self.size))
        self.rank = self.ranks.index(dist.get_rank()) if not self.standalone and ranks else (
            rank if self.standalone else dist.get_rank())
        self.store, self.timeout_s = store, timeout_s
        self._local = {g: i for i, g in enumerate(self.ranks)}
        self._subgroups = 0  # subgroups made so far: every rank makes them in the same order
        self._tags = 0

    def tag(self) -> int:
        """A number every member draws in the same order (names store keys of one executor)."""
        self._tags += 1
        return self._tags

    @property
    def backend(self) -> str:
        """"nccl" or "gloo" (what the group speaks)."""
        nccl = getattr(dist, "ProcessGroupNCCL", None)
        if not self.standalone:
            return str(dist.get_backend(self.group))
        return "nccl" if nccl is not None and isinstance(self.group, nccl) else "gloo"

    @property
    def collective_device(self) -> torch.device:
        """Where a small tensor for this group's collectives lives (NCCL reduces CUDA tensors only)."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @property
    def rank_global(self) -> int:
        return self.ranks[self.rank]

    def batch(self, ops: list[tuple[bool, torch.Tensor, int]]) -> list:
        """Post sends (True) and receives (False) to global ranks at once; one work item per op."""
        if not ops:
            return []
        if not self.standalone:
            return dist.batch_isend_irecv([dist.P2POp(dist.isend if send else dist.irecv, t, peer, self.group)
                                           for send, t, peer in ops])
        if self.backend == "nccl":
            # one NCCL group call: posted one by one, a pair's send and receive could wait on each other
            self.group._start_coalescing()  # a backend object coalesces on its own device
            for send, t, peer in ops:
                (self.group.send if send else self.group.recv)([t], self._local[peer], 0)
            work = self.group._end_coalescing()
            return [work] * len(ops)
        return [self.group.send([t], self._local[peer], 0) if send else self.group.recv([t], self._local[peer], 0)
                for send, t, peer in ops]

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM):
        if not self.standalone:
            return dist.all_reduce(t, op=op, group=self.group, async_op=True)
        opts = dist.AllreduceOptions()
        opts.reduceOp = op
        return self.group.allreduce([t], opts)

    def broadcast(self, t: torch.Tensor, root: int):
        """Broadcast from global rank ``root`` to the members."""
        if not self.standalone:
            return dist.broadcast(t, src=root, group=self.group, async_op=True)
        opts = dist.BroadcastOptions()
        opts.rootRank = self._local[root]
        return self.group.broadcast([t], opts)

    def barrier(self):
        return self.group.barrier() if self.standalone else dist.barrier(group=self.group, async_op=True)

    def subgroup(self, ranks: list[int]) -> "Transport | None":
        """A transport over some global ranks (every rank must call it, in the same order; None for non-members)."""
        ranks = sorted(ranks)
        if not self.standalone:
            group = dist.new_group(ranks)  # every rank of the default group takes part
            return Transport(group, ranks=ranks, timeout_s=self.timeout_s) if self.rank_global in ranks else None
        self._subgroups += 1
        tag = f"{self._subgroups}:" + "-".join(map(str, ranks))  # two groups of the same ranks need two stores
        if self.rank_global not in ranks:
            return None
        me = ranks.index(self.rank_global)
        store = dist.PrefixStore(f"sub:{tag}", self.store)
        if self.backend == "nccl":  # a subgroup of an NCCL group speaks NCCL too
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timedelta(seconds=self.timeout_s)
            pg = dist.ProcessGroupNCCL(store, me, len(ranks), opts)
        else:
            pg = dist.ProcessGroupGloo(store, me, len(ranks), timedelta(seconds=self.timeout_s))
        return Transport(pg, me, len(ranks), self.store, self.timeout_s, ranks)


class _Done:
    def wait(self, timeout=None) -> bool:
        return True


class SoloTransport(Transport):
    """The transport of a process that hosts every rank of a sync: no peers, collectives of one."""

    def __init__(self, timeout_s: float = 120.0) -> None:
        self.group, self.standalone, self.size, self.ranks, self.rank = None, True, 1, [0], 0
        self.store, self.timeout_s, self._local, self._subgroups, self._tags = None, timeout_s, {0: 0}, 0, 0

    backend = "solo"

    def batch(self, ops):
        if ops:
            raise RuntimeError("a process hosting every rank has no peer to send to")
        return []

    def all_reduce(self, t, op=dist.ReduceOp.SUM):
        return _Done()

    def broadcast(self, t, root):
        return _Done()

    def barrier(self):
        return _Done()

    def subgroup(self, ranks):
        return self if list(ranks) == [0] else None


def standalone_transport(rank: int, world_size: int, host: str, port: int, timeout_s: float,
                         backend: str = "gloo", store_on_rank0: bool = True) -> Transport:
    """Join the sync group through the TCP store at ``host:port``: rank 0 hosts it, or, with
    ``store_on_rank0=False``, the launcher already does (``sync.run.local.host_store``)."""
    store = dist.TCPStore(host, port, world_size, store_on_rank0 and rank == 0, timedelta(seconds=timeout_s))
    prefixed = dist.PrefixStore("rlsync", store)
    if backend == "gloo":
        pg = dist.ProcessGroupGloo(prefixed, rank, world_size, timedelta(seconds=timeout_s))
    elif backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timedelta(seconds=timeout_s)
        pg = dist.ProcessGroupNCCL(prefixed, rank, world_size, opts)
    else:
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    return Transport(pg, rank, world_size, store, timeout_s)
