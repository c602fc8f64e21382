"""Verification: proof that what every engine tensor holds after a sync is what the trainer sent.

``checksums`` (the position-aware checksum of a tensor or a piece of one), ``batched`` and ``kernel``
(the same sums for many blocks at once on CUDA, in Triton), ``verifier`` (each sync: senders' expected
sums against what engines hold, agreed on by every rank), ``logits`` (engine logits against a Hugging
Face model holding the trainer's weights: the plan says the right thing, not only the bytes arrived).
"""
