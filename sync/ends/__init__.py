"""Ends of a sync: what a trainer rank sends from and an engine rank receives into.

``base`` (the one method an end has, ``local_tensors()``, and the check that holds an end to the plan),
``megatron`` (megatron-core ``GPTModel`` ranks, read in place), ``reference`` (a reference engine: vLLM's
layout and a real forward pass, checked against Hugging Face), ``vllm`` (the vLLM worker extension),
``versioned`` (an engine that always knows which complete version it serves; staging), ``synthetic``
(seeded weights and plain buffers for tests and benchmarks).
"""
