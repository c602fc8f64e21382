"""Side effects: processes, bytes and ends around the pure plans of ``planners``.

``api`` (the training-loop API), ``session`` (the one place a rank is opened: transport, executor,
versioned target, all from the job's sync settings), ``executor`` (a plan's rounds and copies),
``channels`` (how bytes between processes travel), ``transport`` (the sync's own process group),
``copier``/``copy_kernel`` (batched copies), ``baseline`` (the rank-0 broadcast a sync is compared with),
``ends`` (sources and targets: megatron-core, reference engine, vLLM), ``verify`` (checksums and logits),
``run`` (``rlsync run`` on Ray, local processes, the soak), ``bench`` (benchmarks), ``cli`` (``rlsync``).
"""
