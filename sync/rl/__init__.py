"""A real RLHF loop's pieces: the task and its reward (``task``), GRPO on megatron-core ranks (``trainer``)."""
