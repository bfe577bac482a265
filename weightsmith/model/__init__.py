"""Checkpoints on disk (lazy, tensor by tensor), generic block discovery, atomic output."""
