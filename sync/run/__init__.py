"""Running syncs: ``loop`` (``rlsync run``: the RLHF refresh loop on Ray, trainer and engine actors),
``local`` (one local process per rank for tests, scripts and benchmarks), ``soak`` (thousands of
placement and engine-count changes, each sync verified)."""
