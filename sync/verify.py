"""End-to-end verification of a sync by checksums (see ``sync.tensors``).

Trainer ranks add, for every chunk whose bytes they originate (stage 1, and the stage-2 chunks fed
by it), what those bytes contribute to the destination tensor's checksum; one all-reduce ships the
sums; every engine rank compares each of its tensors with them, and one more all-reduce makes
every rank agree on the verdict. It checks what arrived, however it was moved.
"""

from __future__ import annotations

import numpy as np
import torch

from planners.buckets import stage2_origin
from planners.plan import SyncPlan
from sync.tensors import TORCH_DTYPES, block, checksum_block, checksum_flat

__all__ = ["Verifier"]


class Verifier:
    def __init__(self, plan: SyncPlan, rank) -> None:
        """``rank``: the plan rank this process checks, or a list of them (hosted together)."""
        self.plan = plan
        ranks = [int(rank)] if np.ndim(rank) == 0 else [int(r) for r in rank]
        c = plan.chunks
        self.inf_first = int(np.searchsorted(plan.local_rank, plan.num_trainer))
        origin = stage2_origin(plan)
        mine = np.flatnonzero((c["stage"] == 1) & np.isin(c["src"], ranks))
        fed = np.flatnonzero(np.isin(origin, mine))
        # (chunk whose destination gets the bytes, chunk whose source holds them)
        self.work = [(r, r) for r in mine.tolist()] + [(r, int(origin[r])) for r in fed.tolist()]

    def expected(self, flats: dict[int, torch.Tensor]) -> torch.Tensor:
        """[engine locals, 2] this rank's contributions to every engine tensor's (S0, S1)."""
        plan, c = self.plan, self.plan.chunks
        out = torch.zeros((len(plan.local_name) - self.inf_first, 2), dtype=torch.int64)
        for row, origin in self.work:
            t = plan.tensors[c["tensor"][row]]
            lo, hi = int(c["lo"][row]), int(c["hi"][row])
            data = block(flats[int(c["src_local"][origin])], int(c["src_base"][origin]), t.outer, int(c["src_dim"][origin]),
                         t.inner, int(c["src_off"][origin]) + lo - int(c["lo"][origin]), hi - lo)
            data = data.to(TORCH_DTYPES[t.dtype])  # what the engine receives (a wider source is cast)
            s0, s1 = checksum_block(data, int(c["dst_base"][row]), int(c["dst_dim"][row]), int(c["dst_off"][row]))
            out[int(c["dst_local"][row]) - self.inf_first] += torch.tensor([s0, s1])
        return out

    def check(self, flats: dict[int, torch.Tensor], transport, wait) -> tuple[list[str], int]:
        """Names of this rank's engine tensors whose checksum differs; ``wait(work, label)`` waits
        with the caller's deadline. Returns (local mismatches, total mismatches over all ranks)."""
        device = next(iter(flats.values())).device if flats else torch.device("cpu")
        expected = self.expected(flats).to(device)
        wait(transport.all_reduce(expected), "sharing checksums")
        bad = []
        want = expected.cpu()
        for lid, flat in flats.items():
            if lid >= self.inf_first and tuple(want[lid - self.inf_first].tolist()) != checksum_flat(flat):
                bad.append(self.plan.local_name[lid])
        count = torch.tensor([len(bad)], dtype=torch.int64, device=device)
        wait(transport.all_reduce(count), "agreeing on verification")
        return bad, int(count.item())
