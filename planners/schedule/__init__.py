"""Execution scheduling, derived from a plan the same way on both ends of every pair: ``buckets``
(bounded flat buffers per (stage, source, destination), the rounds they travel in, stage-2 origins)
and ``runs`` (chunks as the byte runs a batched copy kernel moves)."""
