"""Attention kernels: one mask type, one dispatcher (`attend`) and three implementations
(xla reference, blockwise flash in plain JAX, Pallas TPU splash)."""

from hunyuan_jax.model.kernels.attention import AttentionMask, attend, reference_attention

__all__ = ["AttentionMask", "attend", "reference_attention"]
