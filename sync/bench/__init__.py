"""Benchmarks, each printing ratios measured side by side in one run (``rlsync bench ...`` and the
scripts in ``scripts/`` call them): ``sync`` (the plan executor, the rank-0 broadcast baseline and a raw
exchange of the same bytes, on local processes), ``gpu`` (colocated refresh on one GPU: batched copies,
per-slice copies, a flat copy; CUDA IPC), ``multi_gpu`` (trainer and engines on the GPUs of one host over
NCCL), ``plan`` (planning at scale), ``eplb`` (placement policies: time and balance), ``peer``, ``probe``,
``quantize``; ``timing`` their shared timer."""
