"""Imported by the fork server that starts local ranks (``sync.run.local.spawn_ranks``): numba and
rlsync's CPU kernels, loaded once from numba's cache (compiled on a first run), so that every forked
rank starts with them. A rank loading them itself spends 1-2 s of CPU on it, and the tests start a few
hundred ranks on two cores. Loading runs no kernel, so no kernel threads exist when the server forks."""

from __future__ import annotations

from sync import fp8_cpu_kernel
from sync.verify import cpu_kernel

cpu_kernel.load()
fp8_cpu_kernel.load()
